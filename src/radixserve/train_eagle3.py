"""Train an EAGLE-3 draft head for a target model, SpecForge-style, offline:

    python -m radixserve.train_eagle3 --model-path SmolLM2-135M-Instruct --output-dir heads/smol \\
        --num-prompts 2000 --draft-vocab-size 4096 --epochs 2

(`--head eagle` trains an EAGLE-1/2 head instead: over the target's
final-normed output, drafting through the target's LM head rows of the draft
vocabulary, which it writes as token_map.pt for --speculative-token-map.)

1. The target answers generated chat prompts (our Engine, sampled, or
   greedy with --temperature 0) - or, for a model without a chat template,
   random token prompts.
2. Our ModelRunner runs the sequences once more, many per forward, capturing
   three layers' outputs and its greedy choice at every position.
3. The head (models/llama_eagle3.py) learns to predict the target's choices
   num_steps tokens ahead, unrolled as at serving time (training-time test),
   over a reduced vocabulary of the target's most chosen tokens.
4. With --eval-prompts, its drafts are walked over held-out greedy answers
   (speculative/eagle_eval.py): the accept length serving would measure.

Writes config.json + model.safetensors (SpecForge's names: the server loads
it with --speculative-draft-model-path), loss.png and train_log.json."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from tqdm import tqdm

from radixserve.models.llama_eagle import LlamaForCausalLMEagle, rows_logits
from radixserve.models.llama_eagle3 import LlamaForCausalLMEagle3, aux_layer_ids
from radixserve.speculative.eagle_data import (TargetFeatures, answered, draft_vocabulary, random_prompts,
                                               self_generated, self_instructed_prompts, template_ids, windows)
from radixserve.speculative.eagle_eval import evaluate_head
from radixserve.speculative.loss_plot import save_loss_plot

logger = logging.getLogger(__name__)
STEP_WEIGHT = 0.8  # later draft steps count less (SpecForge's decay)
SAVE_SECONDS = 20  # kept from --time-budget for saving the head and its plot
WARMUP = 0.05  # of the run: the learning rate rises from 4% to its peak, then falls to zero on a cosine
CAPTURE_BATCH_SEQS = 256  # sequences per capture forward, at most
HELD_OUT_SEED = 1000  # held-out prompts come from seed + this


def feature_layers(kind: str, num_target_layers: int) -> List[int]:
    """The target layers a head reads (the layer count: the output after the final norm)."""
    return aux_layer_ids(num_target_layers) if kind == "eagle3" else [num_target_layers]


def head_config(target_config, draft_vocab_size: int, layers: List[int], intermediate_size: int = 0,
                kind: str = "eagle3"):
    config = type(target_config).from_dict(target_config.to_dict())
    config.num_hidden_layers = 1
    config.intermediate_size = intermediate_size or target_config.intermediate_size
    config.tie_word_embeddings = False
    if kind == "eagle3":
        config.architectures = ["LlamaForCausalLMEagle3"]
        config.draft_vocab_size = draft_vocab_size
        config.target_hidden_size = target_config.hidden_size
        config.eagle_config = {"eagle_aux_hidden_state_layer_ids": list(layers)}
    else:  # the draft vocabulary is the token map, written beside the head
        config.architectures = ["LlamaForCausalLMEagle"]
    for key in ("gguf_block_types", "quantization_config"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def init_head(config, target, vocab: torch.Tensor, device: str, kind: str = "eagle3") -> torch.nn.Module:
    torch.manual_seed(0)
    head = (LlamaForCausalLMEagle3 if kind == "eagle3" else LlamaForCausalLMEagle)(config).float()
    for name, p in head.named_parameters():
        if p.dtype.is_floating_point:
            torch.nn.init.ones_(p) if name.endswith("norm.weight") else torch.nn.init.normal_(p, std=0.02)
    rows = target.model.lm_head.weight[vocab].detach().float()  # the target's head over the draft vocabulary
    embed = target.model.model.embed_tokens.weight.detach().float().to(device)
    if kind == "eagle3":
        with torch.no_grad():  # its own LM head starts as the target's
            head.lm_head.weight.copy_(rows)
            head.d2t.copy_(vocab - torch.arange(len(vocab)))
            head.t2d.zero_()
            head.t2d[vocab] = True
        head = head.to(device)
        head.embed = lambda ids: torch.nn.functional.embedding(ids, embed)
    else:  # drafts through the target's head rows, frozen
        head = head.to(device)
        rows = rows.to(device)
        head.set_target(lambda ids: torch.nn.functional.embedding(ids, embed), rows_logits(rows), vocab.to(device))
    return head


def batches(samples, args, rng: random.Random) -> Iterator[tuple]:
    """args.batch_size windows at a time, padded at the end to the longest:
    padded positions have label -1 and, being last, are seen by no real one."""
    group = []
    for window in windows(samples, args.window, args.num_steps, rng):
        group.append(window)
        if len(group) == args.batch_size:
            yield stack_windows(group)
            group = []
    if group:
        yield stack_windows(group)


def stack_windows(group: List[tuple]) -> tuple:
    """(features [B, T, F], inputs [S, B, T], labels [S, B, T], soft labels
    ([S, B, T, K] ids and probabilities) or None)."""
    length = max(features.shape[0] for features, _, _, _ in group)
    pad = torch.nn.functional.pad

    features = torch.stack([pad(f, (0, 0, 0, length - f.shape[0])) for f, _, _, _ in group])
    inputs = torch.stack([pad(i, (0, length - i.shape[1]), value=0) for _, i, _, _ in group], 1)
    labels = torch.stack([pad(l, (0, length - l.shape[1]), value=-1) for _, _, l, _ in group], 1)
    if group[0][3] is None:
        return features, inputs, labels, None
    ids = torch.stack([pad(soft[0], (0, 0, 0, length - soft[0].shape[1]), value=-1) for *_, soft in group], 1)
    probs = torch.stack([pad(soft[1], (0, 0, 0, length - soft[1].shape[1])) for *_, soft in group], 1)
    return features, inputs, labels, (ids, probs)


def soft_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                       target_to_draft: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of draft logits [..., V'] against the target's top
    tokens (target ids [..., K], -1 for none) and probabilities [..., K],
    renormalised over those in the draft vocabulary (the target's softmax over
    it, as far as its top K reach); positions with none of them count for nothing."""
    mapped = torch.where(ids >= 0, target_to_draft[ids.clamp(min=0)], -1)
    weights = torch.where(mapped >= 0, probs.float(), 0.0)
    mass = weights.sum(-1)
    weights = weights / mass.clamp(min=1e-9).unsqueeze(-1)
    log_q = logits.float().log_softmax(-1).gather(-1, mapped.clamp(min=0))
    per_position = -(weights * log_q).sum(-1)
    counted = mass > 0
    return per_position[counted].sum() / counted.sum().clamp(min=1)


def add_feature_noise(features: torch.Tensor, scale: float, hidden_size: int) -> torch.Tensor:
    """Features [..., L x hidden] (L captured layers) plus Gaussian noise of
    `scale` times each layer's root mean square at that position (a target's
    layers differ in size: a median RMS of 3, 6 and 22 for the default model's): at
    serving time the head reads features of text it never saw, and noise keeps
    it from keying on exact values."""
    layers = features.unflatten(-1, (-1, hidden_size))
    rms = layers.pow(2).mean(-1, keepdim=True).sqrt()
    return (layers + scale * rms * torch.randn_like(layers)).flatten(-2)


def lr_factor(progress: float) -> float:
    if progress < WARMUP:
        return 0.04 + 0.96 * progress / WARMUP
    return 0.5 * (1 + math.cos(math.pi * min((progress - WARMUP) / (1 - WARMUP), 1.0)))


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """float32 matmuls in TF32 while training, and the process's own setting
    back afterwards: train_eagle3 also runs inside other programs (tests), whose
    float32 references must keep IEEE matmuls."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or previous
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def train(head, samples, args, target_to_draft: torch.Tensor, started: float) -> List[float]:
    with tf32_matmuls(str(args.device).startswith("cuda")):  # the head's float32 matmuls
        return train_steps(head, samples, args, target_to_draft, started)


def train_steps(head, samples, args, target_to_draft: torch.Tensor, started: float) -> List[float]:
    """Progress (for the learning rate) is the larger of the steps done and
    the training time spent, so a run that a time limit stops still anneals."""
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr)
    losses, rng = [], random.Random(0)
    windows_per_epoch = sum(math.ceil(max(len(s.tokens) - 1, 1) / args.window) for s in samples)
    total = max(args.epochs * math.ceil(windows_per_epoch / args.batch_size), 2)
    bar = tqdm(total=total, desc="training", unit="step")
    train_start = time.monotonic()
    deadline = train_start + args.max_train_seconds if args.max_train_seconds else math.inf
    if args.time_budget:
        deadline = min(deadline, started + args.time_budget - SAVE_SECONDS)
    for _ in range(args.epochs):
        for features, inputs, labels, soft in batches(samples, args, rng):
            now = time.monotonic()
            if now > deadline:
                logger.info("the time limit stopped training after %d steps", len(losses))
                bar.close()
                return losses
            progress = max(len(losses) / total, (now - train_start) / max(deadline - train_start, 1e-9))
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(progress)
            # (captured under inference mode: cloned, or noised into a new tensor, to become
            # autograd inputs; moved in the captured dtype, which float32 holds exactly)
            features = features.to(args.device).float()
            features = add_feature_noise(features, args.feature_noise, head.config.hidden_size) \
                if args.feature_noise else features.clone()
            logits = head.train_forward(features, inputs.clone().to(args.device))
            loss = 0.0
            for step, step_logits in enumerate(logits):
                if soft is not None:
                    step_loss = soft_cross_entropy(step_logits, soft[0][step].to(args.device),
                                                   soft[1][step].to(args.device), target_to_draft)
                else:
                    target = labels[step].to(args.device)
                    mapped = torch.where(target >= 0, target_to_draft[target.clamp(min=0)], -1)
                    step_loss = torch.nn.functional.cross_entropy(step_logits.flatten(0, 1), mapped.flatten(),
                                                                  ignore_index=-1)
                loss = loss + STEP_WEIGHT**step * step_loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    bar.close()
    return losses


def save_head(head, config, out: Path, dtype: torch.dtype) -> None:
    """SpecForge's names: q/k/v and gate/up unmerged."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    for name, p in head.named_parameters():
        t = p.detach().cpu()
        t = t.to(dtype) if t.dtype.is_floating_point else t
        owner, _, kind = name.rpartition(".")
        module = head.get_submodule(owner) if owner else None
        if hasattr(module, "shard_offsets"):
            base = owner.rpartition(".")[0]
            parts = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}
            for shard, (offset, size) in module.shard_offsets.items():
                tensors[f"{base}.{parts[shard]}.{kind}"] = t[offset:offset + size].contiguous()
        else:
            tensors[name] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    config.dtype = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(config.to_json_string())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="the target (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--output-dir", help="where the head goes (required unless --generate-only)")
    p.add_argument("--head", choices=("eagle3", "eagle"), default="eagle3",
                   help="eagle3: an EAGLE-3 head (--speculative-algorithm EAGLE3); eagle: an EAGLE-1/2 head and "
                        "its token_map.pt (--speculative-algorithm EAGLE --speculative-token-map)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    p.add_argument("--intermediate-size", type=int, default=0, help="the head's MLP width (0: the target's)")
    p.add_argument("--num-steps", type=int, default=3, help="draft steps unrolled in training")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--window", type=int, default=256, help="positions per training window")
    p.add_argument("--batch-size", type=int, default=1, help="windows per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-train-seconds", type=float, default=0, help="stop training (and save) after this long")
    p.add_argument("--time-budget", type=float, default=0,
                   help="stop training so that the whole run (generation included) ends within this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.7, help="of the target's answers (0: greedy)")
    p.add_argument("--prompts", choices=("auto", "chat", "random"), default="auto",
                   help="chat: generated chat requests; random: random token prompts; auto: chat when the "
                        "tokenizer has a chat template")
    p.add_argument("--self-instruct", type=float, default=0.5,
                   help="the fraction of chat prompts whose question the target writes itself (the rest: templates)")
    p.add_argument("--eval-prompts", type=int, default=0,
                   help="held-out prompts (other seeds) the target answers greedily, on which the head's walked "
                        "accept length and per-step agreement are measured after training (in train_log.json)")
    p.add_argument("--sequences", nargs="+", default=None, metavar="FILE",
                   help="files of the target's answers (training and held-out): read when they all exist (their "
                        "answers together, e.g. from runs on several machines), else one file, written after "
                        "generation, so later runs train on the same data")
    p.add_argument("--generate-only", action="store_true",
                   help="write the answers to --sequences and stop (to train elsewhere, or on several such files)")
    p.add_argument("--capture-batch-tokens", type=int, default=4096,
                   help="tokens per target forward while capturing hidden states")
    p.add_argument("--device", default="cpu", help="where the head trains")
    p.add_argument("--feature-device", default=None,
                   help="where the captured features are kept (default: --device; cpu holds more answers than "
                        "a GPU: 2 x 3 x hidden bytes a token, 32 GB for the default model's 9.2M tokens)")
    p.add_argument("--soft-labels", type=int, default=0, metavar="K",
                   help="learn the target's next-token distribution (its K likeliest tokens, renormalised over "
                        "the draft vocabulary) rather than only its choice; 0: its choice only")
    p.add_argument("--feature-noise", type=float, default=0.0, metavar="SCALE",
                   help="train on features plus Gaussian noise of SCALE x each layer's RMS (0: none)")
    p.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--engine-args", default="{}", help="JSON of extra arguments for the target's Engine")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.generate_only and not args.sequences:
        p.error("--generate-only needs --sequences FILE to write the answers to")
    if not args.generate_only and not args.output_dir:
        p.error("--output-dir is required (unless --generate-only)")
    if args.soft_labels < 0:
        p.error(f"--soft-labels must be >= 0, got {args.soft_labels}")
    if args.feature_noise < 0:
        p.error(f"--feature-noise must be >= 0, got {args.feature_noise}")


def held_out_prompts(engine, args, chat: bool, seqs: List[List[int]]) -> List[List[int]]:
    """--eval-prompts prompts of another seed that no training sequence starts
    with: questions the target writes itself (chat) or random tokens."""
    if not args.eval_prompts:
        return []
    seed = args.seed + HELD_OUT_SEED
    if chat:
        prompts = template_ids(engine.tokenizer, self_instructed_prompts(engine, engine.tokenizer,
                                                                         2 * args.eval_prompts, seed))
    else:
        prompts = random_prompts(args.eval_prompts, engine.tokenizer.vocab_size, seed)
    return [p for p in prompts if not any(s[:len(p)] == p for s in seqs)][:args.eval_prompts]


def generate_sequences(args, extra: dict) -> Tuple[List[List[int]], List[List[int]], List[int]]:
    """The target's answers: training sequences, held-out greedy sequences and their prompts' lengths."""
    from radixserve import Engine

    with Engine(model_path=args.model_path, log_level="warning", **extra) as engine:
        chat = args.prompts == "chat" or (args.prompts == "auto" and
                                          getattr(engine.tokenizer, "chat_template", None) is not None)
        seqs = self_generated(engine, engine.tokenizer, args.num_prompts, args.max_new_tokens, args.seed, chat,
                              args.temperature, args.self_instruct)
        held_out = held_out_prompts(engine, args, chat, seqs)
        held_out_seqs = answered(engine, held_out, args.max_new_tokens, 0.0, args.seed) if held_out else []
    return seqs, held_out_seqs, list(map(len, held_out))


def save_sequences(path: str, seqs: List[List[int]], held_out: List[List[int]], prompt_lens: List[int]) -> None:
    flat = lambda group: torch.tensor([t for s in group for t in s], dtype=torch.int32)  # noqa: E731
    torch.save({"train": flat(seqs), "train_lens": torch.tensor(list(map(len, seqs))),
                "held_out": flat(held_out), "held_out_lens": torch.tensor(list(map(len, held_out)), dtype=torch.int64),
                "held_out_prompt_lens": torch.tensor(prompt_lens, dtype=torch.int64)}, path)


def answers(args, extra: dict) -> Tuple[List[List[int]], List[List[int]], List[int]]:
    """(training answers, held-out answers, held-out prompt lengths): read from
    --sequences when every file exists, else generated (and saved to it)."""
    files = args.sequences or []
    if files and all(Path(f).exists() for f in files):
        return merged_sequences(files)
    if len(files) > 1:
        missing = [f for f in files if not Path(f).exists()]
        raise ValueError(f"sequences: {missing} do not exist (of several files, all are read and none is written)")
    seqs, held_out_seqs, prompt_lens = generate_sequences(args, extra)
    if files:
        save_sequences(files[0], seqs, held_out_seqs, prompt_lens)
    return seqs, held_out_seqs, prompt_lens


def merged_sequences(paths: List[str]) -> Tuple[List[List[int]], List[List[int]], List[int]]:
    """Every file's answers, each once (greedy answers to a template prompt
    that two seeds both drew are equal); a training answer that begins with a
    held-out prompt (another file's seeds may repeat one) is dropped, so the
    held-out walk stays held out."""
    seqs: List[List[int]] = []
    held_out: List[List[int]] = []
    prompt_lens: List[int] = []
    for path in paths:
        train, held, lens = load_sequences(path)
        seqs += train
        held_out += held
        prompt_lens += lens
    prompts: Dict[int, set] = {}
    for seq, n in zip(held_out, prompt_lens):
        prompts.setdefault(n, set()).add(tuple(seq[:n]))
    unique = [list(s) for s in dict.fromkeys(map(tuple, seqs))]
    kept = [s for s in unique if not any(tuple(s[:n]) in group for n, group in prompts.items())]
    if len(kept) < len(seqs):
        logger.info("%d training answers dropped: repeated, or beginning with a held-out prompt",
                    len(seqs) - len(kept))
    return kept, held_out, prompt_lens


def load_sequences(path: str) -> Tuple[List[List[int]], List[List[int]], List[int]]:
    data = torch.load(path)
    split = lambda flat, lens: [s.tolist() for s in flat.split(lens.tolist())]  # noqa: E731
    return (split(data["train"], data["train_lens"]), split(data["held_out"], data["held_out_lens"]),
            data["held_out_prompt_lens"].tolist())


def main(argv=None) -> None:
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs

    args = parse_args(argv)
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    extra = json.loads(args.engine_args)
    # all prompts go to the engine in one call (and the self-instruct questions, up to twice as many)
    extra.setdefault("max_batch_prompts", max(2 * args.num_prompts, 1024))
    seqs, held_out_seqs, prompt_lens = answers(args, extra)
    logger.info("%d self-generated sequences, %d tokens", len(seqs), sum(map(len, seqs)))
    if args.generate_only:
        return
    out = Path(args.output_dir)
    longest = max(map(len, seqs + held_out_seqs))
    # Each sequence's captured features are a tensor of their own: 41,060 of
    # them (9.2M tokens) on an H100 left 58 GB reserved but unallocated and the
    # capture ran out of memory, unless the allocator grows segments in place.
    # (Set here, after generation's engine processes, before this process's first CUDA call.)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # (+ a margin for the partly filled last page of the longest sequence)
    runner = ModelRunner(ServerArgs(model_path=args.model_path, max_total_tokens=max(args.capture_batch_tokens, longest)
                                    + 1024, max_running_requests=CAPTURE_BATCH_SEQS, disable_cuda_graph=True, **extra))
    layers = feature_layers(args.head, runner.config.num_hidden_layers)
    capture = TargetFeatures(runner, layers, args.capture_batch_tokens, CAPTURE_BATCH_SEQS,
                             args.feature_device or args.device, top_k=args.soft_labels)
    samples = list(tqdm(capture.all(seqs), total=len(seqs), desc="target hidden states", unit="seq"))
    vocab = draft_vocabulary(samples, args.draft_vocab_size, runner.config.vocab_size)
    config = head_config(runner.config, len(vocab), layers, args.intermediate_size, args.head)
    head = init_head(config, runner, vocab, args.device, args.head)
    target_to_draft = torch.full((runner.config.vocab_size,), -1, dtype=torch.int64)
    target_to_draft[vocab] = torch.arange(len(vocab))
    losses = train(head, samples, args, target_to_draft.to(args.device), started)
    save_head(head, config, out, getattr(torch, args.save_dtype))
    if args.head == "eagle":
        torch.save(vocab.clone(), out / "token_map.pt")
    save_loss_plot(losses, out / "loss.png")
    log = {"args": vars(args), "sequences": len(seqs), "tokens": sum(map(len, seqs)),
           "losses": losses[::max(len(losses) // 500, 1)], "steps": len(losses)}
    if held_out_seqs:
        del samples
        evaluation = evaluate_head(head.eval(), list(capture.all(held_out_seqs)), prompt_lens, vocab,
                                   args.num_steps, args.device)
        log["held_out"] = {"prompts": len(held_out_seqs), **asdict(evaluation)}
        logger.info("held-out prompts: walked accept length %.3f over %d verify steps; per-step agreement %s",
                    evaluation.accept_length, evaluation.verify_steps,
                    " ".join(f"{a:.3f}" for a in evaluation.step_agreement))
    (out / "train_log.json").write_text(json.dumps(log))
    logger.info("head written to %s (final loss %.3f)", out, sum(losses[-50:]) / max(len(losses[-50:]), 1))


if __name__ == "__main__":
    main()
