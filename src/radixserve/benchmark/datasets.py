"""Benchmark workloads: random text, random token ids, groups sharing a system
prompt, and ShareGPT conversations from a local file. Every draw comes from one
`random.Random(seed)`, so a seed gives the same prompts on every run."""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

from radixserve.benchmark.tokenizer import num_special_tokens, word_token_ids

logger = logging.getLogger(__name__)

DATASET_NAMES = ("random", "random-ids", "generated-shared-prefix", "sharegpt")

# ShareGPT conversations outside these bounds are skipped: too short to time,
# or too long for the context lengths we benchmark at.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass
class BenchRequest:
    prompt: str  # the text sent to text backends
    prompt_ids: List[int]  # the prompt as the server counts it (sent as is when use_ids)
    output_len: int  # max new tokens (exact when EOS is ignored)
    use_ids: bool = False  # send prompt_ids instead of the text
    lora_name: Optional[str] = None  # the LoRA adapter to run it with (None: the base model)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass
class DatasetConfig:
    dataset_name: str = "random"
    dataset_path: Optional[str] = None
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 0.0
    gsp_num_groups: int = 64
    gsp_prompts_per_group: int = 16
    gsp_system_prompt_len: int = 2048
    gsp_question_len: int = 128
    gsp_output_len: int = 256
    seed: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DatasetConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    d = DatasetConfig()
    parser.add_argument("--dataset-name", choices=DATASET_NAMES, default=d.dataset_name)
    parser.add_argument("--dataset-path", default=d.dataset_path,
                        help="a local ShareGPT-format JSON file (sharegpt only; nothing is downloaded)")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts,
                        help="requests to send (generated-shared-prefix: groups x prompts per group)")
    parser.add_argument("--random-input-len", type=int, default=d.random_input_len)
    parser.add_argument("--random-output-len", type=int, default=d.random_output_len)
    parser.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                        help="lengths are drawn uniformly from [ratio * len, len]")
    parser.add_argument("--gsp-num-groups", type=int, default=d.gsp_num_groups)
    parser.add_argument("--gsp-prompts-per-group", type=int, default=d.gsp_prompts_per_group)
    parser.add_argument("--gsp-system-prompt-len", type=int, default=d.gsp_system_prompt_len)
    parser.add_argument("--gsp-question-len", type=int, default=d.gsp_question_len)
    parser.add_argument("--gsp-output-len", type=int, default=d.gsp_output_len)
    parser.add_argument("--seed", type=int, default=d.seed)


def sample_requests(cfg: DatasetConfig, tokenizer: Any) -> List[BenchRequest]:
    rng = random.Random(cfg.seed)
    name = cfg.dataset_name
    if name in ("random", "random-ids"):
        return random_requests(tokenizer, rng, cfg.num_prompts, cfg.random_input_len,
                               cfg.random_output_len, cfg.random_range_ratio, use_ids=name == "random-ids")
    if name == "generated-shared-prefix":
        return shared_prefix_requests(tokenizer, rng, cfg.gsp_num_groups, cfg.gsp_prompts_per_group,
                                      cfg.gsp_system_prompt_len, cfg.gsp_question_len, cfg.gsp_output_len)
    if name == "sharegpt":
        if not cfg.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path (a local ShareGPT JSON file)")
        return sharegpt_requests(tokenizer, rng, cfg.dataset_path, cfg.num_prompts)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")


# ---- random ----
def draw_lengths(rng: random.Random, n: int, length: int, range_ratio: float) -> List[int]:
    low = max(int(length * range_ratio), 1)
    return [rng.randint(low, max(length, low)) for _ in range(n)]


def random_ids(rng: random.Random, pool: List[int], n: int) -> List[int]:
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def text_request(tokenizer: Any, ids: List[int], output_len: int) -> BenchRequest:
    """Decode ids to text; prompt_ids is what the server will count for that text
    (the same ids, plus a BOS when the tokenizer adds one)."""
    text = tokenizer.decode(ids)
    return BenchRequest(text, tokenizer.encode(text), output_len)


def random_requests(tokenizer: Any, rng: random.Random, num: int, input_len: int, output_len: int,
                    range_ratio: float, use_ids: bool = False) -> List[BenchRequest]:
    pool = word_token_ids(tokenizer)
    in_lens = draw_lengths(rng, num, input_len, range_ratio)
    out_lens = draw_lengths(rng, num, output_len, range_ratio)
    # Text prompts count the tokens the tokenizer adds, so the server sees the drawn length.
    added = 0 if use_ids else num_special_tokens(tokenizer)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = random_ids(rng, pool, max(n_in - added, 1))
        if use_ids:
            requests.append(BenchRequest(tokenizer.decode(ids), ids, n_out, use_ids=True))
        else:
            requests.append(text_request(tokenizer, ids, n_out))
    return requests


# ---- generated shared prefix ----
def shared_prefix_requests(tokenizer: Any, rng: random.Random, num_groups: int, per_group: int,
                           system_len: int, question_len: int, output_len: int) -> List[BenchRequest]:
    """num_groups system prompts of system_len tokens, each followed by per_group
    different questions of question_len tokens; shuffled, as users would arrive."""
    pool = word_token_ids(tokenizer)
    added = num_special_tokens(tokenizer)
    requests = []
    for _ in range(num_groups):
        system = random_ids(rng, pool, max(system_len - added, 1))
        for _ in range(per_group):
            requests.append(text_request(tokenizer, system + random_ids(rng, pool, question_len), output_len))
    rng.shuffle(requests)
    return requests


# ---- ShareGPT ----
@dataclass
class Conversation:
    prompt: str
    reply: str


def load_sharegpt(path: str) -> List[Conversation]:
    """The first human turn and the reply to it from each conversation of a
    ShareGPT-format file (a JSON list, or JSON lines)."""
    text = Path(path).expanduser().read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [c for c in (_first_exchange(r) for r in records) if c is not None]


def _first_exchange(record: dict) -> Optional[Conversation]:
    turns = record.get("conversations") or record.get("conversation") or []
    if len(turns) < 2:
        return None
    ask, answer = turns[0], turns[1]
    if ask.get("from") not in ("human", "user") or answer.get("from") not in ("gpt", "assistant", "chatgpt"):
        return None
    return Conversation(str(ask.get("value", "")), str(answer.get("value", "")))


def sharegpt_requests(tokenizer: Any, rng: random.Random, path: str, num: int) -> List[BenchRequest]:
    conversations = load_sharegpt(path)
    rng.shuffle(conversations)
    requests = []
    for prompt, out_len in _usable(tokenizer, conversations):
        requests.append(BenchRequest(prompt, tokenizer.encode(prompt), out_len))
        if len(requests) == num:
            break
    if len(requests) < num:
        logger.warning("%s has only %d usable conversations; asked for %d", path, len(requests), num)
    if not requests:
        raise ValueError(f"{path} has no usable ShareGPT conversations")
    return requests


def _usable(tokenizer: Any, conversations: Iterable[Conversation]) -> Iterable[Tuple[str, int]]:
    """(prompt, output length) of each conversation inside the length bounds; the
    output length is the recorded reply's token count."""
    for conv in conversations:
        prompt_len = len(tokenizer.encode(conv.prompt))
        out_len = len(tokenizer.encode(conv.reply, add_special_tokens=False))
        if prompt_len < SHAREGPT_MIN_LEN or out_len < SHAREGPT_MIN_LEN:
            continue
        if prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + out_len > SHAREGPT_MAX_TOTAL_LEN:
            continue
        yield conv.prompt, out_len
