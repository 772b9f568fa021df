"""A minimal GRPO loop: rollouts from radixserve's Engine, training with plain
torch on a transformers copy of the policy, new weights pushed into the engine
after every step (update_weights_from_tensor). Runs on a laptop CPU in minutes.

    python examples/rl_grpo.py                      # 30 steps
    python examples/rl_grpo.py --short --deterministic --json-out run.json

The policy is a tiny random-init Llama (64-token vocabulary, 82k parameters).
The task is verifiable: the reward of a completion is the fraction of its tokens
that fall in a fixed target set (8 of the 64 tokens, so a random policy scores
about 1/8). Each step samples a group of G completions per prompt at
temperature 1, each with its own sampling_seed; advantages are the rewards
normalised within their group; the loss is the policy gradient
-mean(advantage * mean log-prob of the sampled tokens), computed by the trainer's
model. With one optimizer step per rollout the policy is exactly on-policy, so
GRPO's importance ratio is 1 and its clipping never acts; there is no KL term.

--deterministic makes two runs with the same --seed print the same rollouts
and losses: the engine runs with --enable-deterministic-inference (a request's
tokens and logprobs do not depend on how the scheduler batches it), and seeds
are fixed everywhere (model init, prompts, one sampling_seed per request, the
engine's random_seed), with torch.use_deterministic_algorithms and one thread
in the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

VOCAB_SIZE = 64
TARGET_TOKENS = frozenset(range(10, 18))  # the reward counts these
FIRST_WORD_ID = 3  # 0-2: pad, bos, eos


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: List[int]
    completion_ids: List[int]
    engine_logprobs: List[float]  # as the engine sampled them, for the on-policy check
    reward: float


@dataclass
class StepRecord:
    step: int
    mean_reward: float
    loss: float
    max_logprob_gap: float  # engine vs trainer on the sampled tokens: the weights agree
    rollouts: List[List[int]]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="same seed, same rollouts and losses (see the module docstring)")
    p.add_argument("--short", action="store_true", help="a quick run for CI (about 12 steps)")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    p.add_argument("--prompt-len", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--json-out", type=Path, help="write every step's rollouts, rewards and loss here")
    args = p.parse_args(argv)
    if args.short:
        args.steps = min(args.steps, 12)
    return args


# ---- the policy ----
def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over "t3".."t63", so ids read back as text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(FIRST_WORD_ID, VOCAB_SIZE)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def build_policy(folder: Path, seed: int) -> torch.nn.Module:
    """A tiny Llama with fresh random weights, saved (with its tokenizer) for the engine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                         initializer_range=0.05)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return model


# ---- the task ----
def make_prompts(num: int, length: int, seed: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (num, length), generator=g).tolist()


def reward_of(completion: List[int]) -> float:
    return sum(t in TARGET_TOKENS for t in completion) / len(completion)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps): rewards [P * G], grouped by prompt."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.flatten()


# ---- one step ----
def sampling_seed(seed: int, step: int, index: int) -> int:
    """A distinct, reproducible seed per (run, step, sample)."""
    return (seed * 1_000_003 + step) * 10_007 + index


def generate(engine, input_ids: List[List[int]], params: List[Dict]) -> List[Dict]:
    return engine.generate(input_ids=input_ids, sampling_params=params, return_logprob=True)


def rollout(engine, prompts: List[List[int]], step: int, args: argparse.Namespace) -> List[Sample]:
    batch = [(i, ids) for i, ids in enumerate(prompts) for _ in range(args.group_size)]
    params = [{"temperature": 1.0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True,
               "sampling_seed": sampling_seed(args.seed, step, n)} for n in range(len(batch))]
    outputs = generate(engine, [ids for _, ids in batch], params)
    return [
        Sample(i, ids, out["output_ids"], [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]],
               reward_of(out["output_ids"]))
        for (i, ids), out in zip(batch, outputs)
    ]


def sampled_logprobs(model: torch.nn.Module, samples: List[Sample]) -> torch.Tensor:
    """log p(token) of each sampled completion token under the trainer's model: [N, T]."""
    sequences = torch.tensor([s.prompt_ids + s.completion_ids for s in samples])
    prompt_len = len(samples[0].prompt_ids)
    logits = model(sequences).logits[:, prompt_len - 1:-1].float()
    completions = sequences[:, prompt_len:]
    return torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)


def train_step(model, optimizer, samples: List[Sample], group_size: int) -> Tuple[float, float]:
    """One policy-gradient step; returns (loss, largest engine-vs-trainer log-prob gap)."""
    rewards = torch.tensor([s.reward for s in samples])
    advantages = group_advantages(rewards, group_size)
    logprobs = sampled_logprobs(model, samples)
    loss = -(advantages * logprobs.mean(dim=1)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    engine_logprobs = torch.tensor([s.engine_logprobs for s in samples])
    gap = (engine_logprobs - logprobs.detach()).abs().max().item()
    return loss.item(), gap


# ---- the loop ----
def engine_kwargs(model_dir: Path, args: argparse.Namespace) -> Dict:
    return dict(model_path=str(model_dir), random_seed=args.seed, log_level="error", max_total_tokens=4096,
                enable_deterministic_inference=args.deterministic)


def run(args: argparse.Namespace) -> List[StepRecord]:
    from radixserve import Engine

    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_policy(Path(tmp), args.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        prompts = make_prompts(args.num_prompts, args.prompt_len, args.seed)
        with Engine(**engine_kwargs(Path(tmp), args)) as engine:
            for step in range(args.steps):
                samples = rollout(engine, prompts, step, args)
                loss, gap = train_step(model, optimizer, samples, args.group_size)
                ok, message = engine.update_weights_from_tensor(list(model.state_dict().items()),
                                                                weight_version=f"step-{step + 1}")
                if not ok:
                    raise RuntimeError(f"weight update failed: {message}")
                record = StepRecord(step, sum(s.reward for s in samples) / len(samples), loss, gap,
                                    [s.completion_ids for s in samples])
                records.append(record)
                print(f"step {step:3d}  reward {record.mean_reward:.3f}  loss {loss:+.5f}  "
                      f"logprob gap {gap:.1e}  rollout[0] {record.rollouts[0]}", flush=True)
    return records


def summarize(records: List[StepRecord]) -> Dict[str, float]:
    k = max(1, len(records) // 4)
    return {"first_mean_reward": sum(r.mean_reward for r in records[:k]) / k,
            "last_mean_reward": sum(r.mean_reward for r in records[-k:]) / k}


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    records = run(args)
    summary = summarize(records)
    print(f"mean reward: first {len(records) // 4 or 1} steps {summary['first_mean_reward']:.3f} -> "
          f"last {len(records) // 4 or 1} steps {summary['last_mean_reward']:.3f}")
    print(f"{len(records)} steps in {time.perf_counter() - start:.1f}s")
    if args.json_out:
        args.json_out.write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items() if k != "json_out"}, **summary,
             "steps": [dataclasses.asdict(r) for r in records]}, indent=1))


if __name__ == "__main__":
    main()
