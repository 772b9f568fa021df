"""Training data for an EAGLE-3 head, all produced offline by our own engine:
prompts answered by the target itself (`self_generated`), then the target's
captured hidden states and greedy choices at every position (`TargetFeatures`)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from radixserve.managers.schedule_batch import set_extend_lens
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

TOPICS = ["the ocean", "a small town", "computers", "cooking pasta", "the moon", "friendship", "a rainy day",
          "learning to swim", "ancient Rome", "electric cars", "a garden", "music lessons", "the human heart",
          "mountains", "a lost cat", "saving money", "volcanoes", "chess", "a train journey", "honey bees",
          "the internet", "winter sports", "photosynthesis", "a birthday party", "robots", "coffee",
          "the solar system", "recycling", "a library", "dinosaurs", "public speaking", "bread baking",
          "the French Revolution", "climate change", "a job interview", "machine learning", "the stock market",
          "a camping trip", "vaccines", "the Roman alphabet", "sleep", "a city at night", "earthquakes",
          "writing a resume", "the water cycle", "a hospital", "video games", "the Great Wall of China",
          "a football match", "time management", "airplanes", "the brain", "a farmer's market", "painting",
          "social media", "renewable energy", "a first day at school", "the desert", "whales", "a thunderstorm",
          "learning to code", "the printing press", "healthy breakfasts", "a museum visit", "rivers",
          "an old lighthouse", "teamwork", "the history of tea", "a space station", "bicycles", "forests",
          "the Olympic Games", "a detective", "gravity", "a wedding", "smartphones", "the Amazon rainforest",
          "a haunted house", "democracy", "yoga", "a road trip", "chocolate", "the periodic table",
          "penguins", "the Renaissance", "origami", "a marathon", "tides", "credit cards", "a bakery",
          "the immune system", "jazz", "glaciers", "a science fair", "carpentry", "the Moon landing",
          "microplastics", "a submarine", "birdwatching", "the Silk Road", "spreadsheets", "a tiny house",
          "bacteria", "the Nile", "knitting", "a power outage", "insurance", "ants", "the Eiffel Tower",
          "a spelling bee", "nuclear energy", "tigers", "the Industrial Revolution", "a zoo", "taxes",
          "a coral reef", "sushi", "the Wright brothers", "a pharmacy", "hurricanes", "the violin",
          "a chess tournament", "lighthouses", "the speed of light", "composting", "a flea market",
          "electric guitars", "the Arctic", "kindness", "a dentist visit", "black holes", "pottery",
          "the Vikings", "a podcast", "rain forests", "password security", "a hiking trail", "the lungs",
          "ice cream", "Shakespeare", "a volunteer project", "satellites", "a village festival", "octopuses",
          "the metric system", "meditation", "a bus driver", "the Pyramids of Giza", "budgeting",
          "wolves", "a snowstorm", "the telephone", "homework", "a vegetable soup", "magnets", "kites",
          "the Sahara", "a fire station", "languages", "a treasure map", "the ocean floor", "trains",
          "a mystery novel", "vitamins", "an island", "the first computers", "a dog park", "bridges"]
TASKS = ["Write a short story about {}.", "Explain {} to a child.", "Give three facts about {}.",
         "Describe {} in a few sentences.", "Write a poem about {}.", "What are the pros and cons of {}?",
         "Summarize what people should know about {}.", "Write a friendly email about {}.",
         "List five questions a student might ask about {}.", "Write a news headline and a short article about {}.",
         "Compare {} with something similar.", "Give step-by-step advice related to {}.",
         "Write a dialogue between two friends about {}.", "What is the history of {}?",
         "Explain why {} matters, in one paragraph.", "Tell me a fun fact about {} and explain it.",
         "Write a short speech about {}.", "What are common mistakes people make with {}?",
         "Give me a simple plan for a week related to {}.", "How would you teach a beginner about {}?",
         "Write a limerick about {}.", "What would the world be like without {}?",
         "Describe a typical day involving {}.", "Give two arguments for and two against {}."]


def chat_prompts(count: int, seed: int, unique: bool = False) -> List[List[dict]]:
    """Chat requests built from topic and task templates; unique: no request
    twice (at most len(TASKS) x len(TOPICS))."""
    rng = random.Random(seed)
    if unique:
        pairs = [(task, topic) for task in TASKS for topic in TOPICS]
        rng.shuffle(pairs)
        return [[{"role": "user", "content": task.format(topic)}] for task, topic in pairs[:count]]
    return [[{"role": "user", "content": rng.choice(TASKS).format(rng.choice(TOPICS))}] for _ in range(count)]


QUESTION_REQUEST = ("Write one question that a curious person might ask an AI assistant about {}. "
                    "Reply with the question only.")


def template_ids(tokenizer, messages: List[List[dict]]) -> List[List[int]]:
    return [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)
                 ["input_ids"]) for m in messages]


def self_instructed_prompts(engine, tokenizer, count: int, seed: int) -> List[List[dict]]:
    """Chat requests whose questions the target itself wrote (sampled hot, for
    variety), each question once: wider than the templates, still in the
    target's own words."""
    rng = random.Random(seed + 1)
    tries = 2 * count  # a small model often answers with something other than a question
    asks = template_ids(tokenizer, [[{"role": "user", "content": QUESTION_REQUEST.format(rng.choice(TOPICS))}]
                                    for _ in range(tries)])
    params = [{"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 48, "sampling_seed": seed + 7919 * (i + 1)}
              for i in range(tries)]
    outs = engine.generate(input_ids=asks, sampling_params=params)
    questions = dict.fromkeys(q for q in map(question_in, (o["text"] for o in outs)) if q)
    return [[{"role": "user", "content": q}] for q in list(questions)[:count]]


def question_in(text: str) -> Optional[str]:
    """The question a reply holds: a quoted one, or the reply's first line
    when that is a question; None otherwise."""
    quoted = [q.strip() for q in re.findall(r'"([^"]{8,300})"', text) if q.strip().endswith("?")]
    if quoted:
        return quoted[0]
    line = text.strip().split("\n")[0].strip()
    return line if 8 <= len(line) <= 300 and line.endswith("?") else None


def self_generated(engine, tokenizer, count: int, max_new_tokens: int, seed: int, chat: bool,
                   temperature: float = 0.7, self_instruct: float = 0.0) -> List[List[int]]:
    """Token sequences (prompt + the target's own answer). Chat prompts come
    from the templates and, for a `self_instruct` fraction of them, from
    questions the target wrote. Greedy answers (temperature 0) to a repeated
    prompt would repeat too: then every template is used once at most and
    the target writes the questions still missing. chat=False (a model
    without a chat template, e.g. a tiny test model): random token prompts."""
    if chat:
        asked_count = int(count * self_instruct)
        templates = chat_prompts(count - asked_count, seed, unique=temperature == 0)
        asked_count = count - len(templates)
        asked = self_instructed_prompts(engine, tokenizer, asked_count, seed) if asked_count else []
        prompts = template_ids(tokenizer, templates + asked)
    else:
        prompts = random_prompts(count, tokenizer.vocab_size, seed)
    return answered(engine, prompts, max_new_tokens, temperature, seed)


def random_prompts(count: int, vocab_size: int, seed: int) -> List[List[int]]:
    """Prompts of 4-24 random token ids (below 1,000), for a model without a chat template."""
    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab_size, 1000)) for _ in range(rng.randint(4, 24))] for _ in range(count)]


def answered(engine, prompts: List[List[int]], max_new_tokens: int, temperature: float, seed: int) -> List[List[int]]:
    params = [{"temperature": temperature, "top_p": 0.95, "max_new_tokens": max_new_tokens, "sampling_seed": seed + i}
              for i in range(len(prompts))]
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    return [p + o["output_ids"] for p, o in zip(prompts, outs)]


@dataclass
class Sample:
    features: torch.Tensor  # [T, layers x hidden] the captured layers' outputs (the target's dtype)
    greedy: torch.Tensor  # [T] int64: the target's argmax after each position
    tokens: torch.Tensor  # [T] int64
    # With TargetFeatures(top_k=K): the target's K likeliest next tokens after
    # each position [T, K] (int64) and their probabilities [T, K] (float16).
    top_ids: Optional[torch.Tensor] = None
    top_probs: Optional[torch.Tensor] = None


class TargetFeatures:
    """Runs the target (a ModelRunner) over whole sequences, several per
    extend forward, capturing `layers`; each batch's KV is freed right after.
    The runner's pools must hold max_batch_tokens (0: one sequence per
    forward) or the longest sequence, and max_batch_seqs requests. The
    features are kept on store_device. top_k > 0 keeps the target's top_k
    likeliest next tokens and their probabilities too (soft labels)."""

    def __init__(self, runner, layers: Sequence[int], max_batch_tokens: int = 0, max_batch_seqs: int = 1,
                 store_device: str = "cpu", top_k: int = 0) -> None:
        self.runner, self.layers, self.store_device = runner, tuple(layers), store_device
        self.top_k = top_k
        self.pools = runner.pools
        self.max_batch_tokens, self.max_batch_seqs = max_batch_tokens, max_batch_seqs

    def __call__(self, ids: List[int]) -> Sample:
        return self.batch([ids])[0]

    def all(self, seqs: Sequence[List[int]]) -> Iterator[Sample]:
        """Samples of `seqs`, in order, batched up to max_batch_tokens tokens
        (counted in whole KV pages, as the pool hands them out)."""
        page = self.pools.allocator.page_size
        budget = min(self.max_batch_tokens, self.pools.allocator.available_size())
        group: List[List[int]] = []
        used = 0
        for ids in seqs:
            cost = -(-len(ids) // page) * page
            if group and (used + cost > budget or len(group) == self.max_batch_seqs):
                yield from self.batch(group)
                group, used = [], 0
            group.append(ids)
            used += cost
        if group:
            yield from self.batch(group)

    @torch.inference_mode()
    def batch(self, seqs: List[List[int]]) -> List[Sample]:
        pools, dev = self.pools, self.runner.device
        lens = [len(ids) for ids in seqs]
        slots = pools.allocator.alloc_extend([0] * len(seqs), lens, [0] * len(seqs))
        if slots is None:
            raise ValueError(f"{sum(lens)} tokens in {len(seqs)} sequences do not fit the target's KV pool")
        rows = [pools.req_to_token_pool.alloc() for _ in seqs]
        starts = [sum(lens[:i]) for i in range(len(seqs))]
        try:
            for row, start, n in zip(rows, starts, lens):
                pools.req_to_token_pool.req_to_token[row, :n] = slots[start:start + n]
            total = sum(lens)
            fb = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=len(seqs),
                              input_ids=torch.tensor([t for ids in seqs for t in ids], device=dev),
                              positions=torch.cat([torch.arange(n) for n in lens]).to(dev),
                              req_pool_indices=torch.tensor(rows, device=dev), seq_lens=torch.tensor(lens, device=dev),
                              out_cache_loc=slots, seq_lens_cpu=lens, logits_indices=torch.arange(total, device=dev),
                              last_logit_rows=torch.tensor([s + n - 1 for s, n in zip(starts, lens)], device=dev),
                              req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool,
                              capture_aux_layers=self.layers)
            set_extend_lens(fb, [0] * len(seqs), lens, dev)
            out = self.runner.forward(fb)
            logits = out.all_logits if out.all_logits is not None else out.next_token_logits
            greedy = logits.argmax(-1).cpu()
            features = out.aux_hidden.to(self.store_device)
            top_ids, top_probs = self._top(logits) if self.top_k else (None, None)
            part = lambda t, s, n: None if t is None else t[s:s + n].clone()  # noqa: E731
            return [Sample(features[s:s + n].clone(), greedy[s:s + n], torch.tensor(ids),
                           part(top_ids, s, n), part(top_probs, s, n))
                    for s, n, ids in zip(starts, lens, seqs)]
        finally:
            for row, start, n in zip(rows, starts, lens):  # free() takes one request's slots at a time
                pools.allocator.free(slots[start:start + n])
                pools.req_to_token_pool.free(row)

    def _top(self, logits: torch.Tensor, rows_at_once: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
        """The top_k tokens of each row's softmax and their probabilities: the
        logits' top_k minus the row's log-sum-exp (no softmax of the whole row
        is kept; a few thousand rows at a time, since a float32 copy of 16k
        rows over a 49k vocabulary is 3 GB)."""
        ids, probs = [], []
        for chunk in logits.split(rows_at_once):
            chunk = chunk.float()
            top = chunk.topk(self.top_k, -1)
            ids.append(top.indices.to(self.store_device))
            probs.append((top.values - chunk.logsumexp(-1, keepdim=True)).exp().half().to(self.store_device))
        return torch.cat(ids), torch.cat(probs)


def draft_vocabulary(samples: Sequence[Sample], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` target tokens the head may propose: those the target chose
    most often (ties by id), sorted by id."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in samples:
        counts += torch.bincount(s.greedy, minlength=vocab_size)
    return counts.topk(min(size, vocab_size)).indices.sort().values


def windows(samples: Sequence[Sample], length: int, num_steps: int, rng: random.Random) -> Iterator[tuple]:
    """(features [T, F], step inputs [S, T], step labels [S, T], soft labels)
    windows of each sample, in random order. Step s at origin p reads token
    p+1 (s = 0) or the target's choice after p+s, and must predict the
    target's choice after p+1+s; -1 where the window runs past the sample.
    Soft labels: None, or the target's top tokens [S, T, K] (-1 past the
    sample) and probabilities [S, T, K] after p+1+s, where the samples have them."""
    order = [(i, start) for i, s in enumerate(samples) for start in range(0, max(len(s.tokens) - 1, 1), length)]
    rng.shuffle(order)
    for i, start in order:
        s = samples[i]
        total = len(s.tokens)
        end = min(start + length, total - 1)  # origins need the next token
        origins = torch.arange(start, end)
        inputs, labels, top_ids, top_probs = [], [], [], []
        for step in range(num_steps):
            src = s.tokens if step == 0 else s.greedy
            at = origins + 1 if step == 0 else origins + step
            inputs.append(torch.where(at < total, src[at.clamp(max=total - 1)], 0))
            target_at = origins + 1 + step
            inside, at_target = target_at < total, target_at.clamp(max=total - 1)
            labels.append(torch.where(inside, s.greedy[at_target], -1))
            if s.top_ids is not None:
                top_ids.append(torch.where(inside[:, None], s.top_ids[at_target], -1))
                top_probs.append(s.top_probs[at_target])
        soft = (torch.stack(top_ids), torch.stack(top_probs)) if top_ids else None
        yield s.features[start:end], torch.stack(inputs), torch.stack(labels), soft
