"""What a quantized weight format costs in accuracy, on a model with real weights.

    python bench/quant_accuracy.py [--method fp8|int8wo|int4wo-32|gguf|w8a8_int8|bf16] [--model-path SmolLM2-135M-Instruct]
        [--prompts 100] [--device cpu|cuda] [--dtype float32|bfloat16] [--out results.json]
        [--prompts-per-forward 8] [--chunk N]

The prompts are the first N lines of at least 40 characters of this
repository's docs (real text, the same on every machine). Each prompt runs
teacher-forced through two model runners on the same weights: the reference
(unquantized, --dtype) and the quantized one (`--quantization fp8|gguf` or
`--torchao-config int8wo|int4wo-32`, with --dtype auto: the int kernels run
their activations in bfloat16; `bf16` is the unquantized model in bfloat16),
and every position's logits are compared (the quantized runner's forwards hold
--prompts-per-forward prompts, in extends of --chunk tokens each, so the row
count picks the kernel a CPU int4 or int8 format runs: a prefill's
dequantized GEMM from 128 rows, the 4-bit or 8-bit kernel below):
relative L2 error
||fp8 - ref|| / ||ref|| over all positions, the mean KL divergence of the
next-token distributions, and how often the top-1 token agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from radixserve.model_executor.model_runner import ModelRunner  # noqa: E402
from radixserve.server_args import ServerArgs  # noqa: E402
from radixserve.utils.hf_utils import load_tokenizer  # noqa: E402
from tests.models.deepseek_tiny import teacher_forced_logits  # noqa: E402


def doc_prompts(count: int) -> List[str]:
    lines = []
    for path in sorted((ROOT / "docs").glob("*.md")):
        lines += [line.strip() for line in path.read_text().splitlines() if len(line.strip()) >= 40]
    if len(lines) < count:
        raise SystemExit(f"only {len(lines)} prompt lines in docs/")
    return lines[:count]


# method -> the quantized runner's flags (the int kernels pick bfloat16 activations with --dtype auto)
METHODS = {
    "fp8": {"quantization": "fp8"},
    "int8wo": {"torchao_config": "int8wo", "dtype": "auto"},
    "int4wo-32": {"torchao_config": "int4wo-32", "dtype": "auto"},
    "gguf": {"quantization": "gguf", "dtype": "auto"},
    "w8a8_int8": {"quantization": "w8a8_int8"},
    "bf16": {"dtype": "bfloat16"},  # no quantization: what bfloat16 alone costs
}


def runner_logits(runner: ModelRunner, ids: List[List[int]], per_forward: int = 8,
                  chunk: Optional[int] = None) -> List[torch.Tensor]:
    """Every position's float32 logits of each prompt, teacher-forced:
    per_forward prompts in each forward, in extends of `chunk` tokens (None: all at once)."""
    out = []
    for start in range(0, len(ids), per_forward):
        batch = ids[start:start + per_forward]
        longest = max(map(len, batch))
        size = chunk or longest
        out += [x.float().cpu() for x in teacher_forced_logits(runner, batch, chunks=[size] * -(-longest // size),
                                                                decode_steps=0)]
    return out


def logits_of(args: argparse.Namespace, ids: List[List[int]], method) -> List[torch.Tensor]:
    flags = METHODS.get(method, {})
    runner = ModelRunner(ServerArgs(**{"model_path": args.model_path, "device": args.device, "dtype": args.dtype,
                                       "max_total_tokens": 4096, **flags}))
    if not method:  # the reference: 8 prompts a forward, each whole
        return runner_logits(runner, ids)
    return runner_logits(runner, ids, args.prompts_per_forward, args.chunk)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="fp8", choices=list(METHODS))
    p.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="the reference's dtype (and fp8's activations)")
    p.add_argument("--out")
    p.add_argument("--prompts-per-forward", type=int, default=8, help="prompts batched in each forward")
    p.add_argument("--chunk", type=int, help="new tokens per extend of each prompt (default: all at once)")
    args = p.parse_args()
    from radixserve.model_loader.source import resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(args.model_path))
    ids = [tokenizer.encode(text)[:128] for text in doc_prompts(args.prompts)]
    ref = torch.cat(logits_of(args, ids, None))
    fp8 = torch.cat(logits_of(args, ids, args.method))
    kl = torch.nn.functional.kl_div(fp8.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    result = {
        "method": args.method, "model": args.model_path, "device": args.device, "dtype": args.dtype, "prompts": len(ids),
        "prompts_per_forward": args.prompts_per_forward, "chunk": args.chunk,
        "positions": ref.shape[0],
        "rel_l2": ((fp8 - ref).norm() / ref.norm()).item(),
        "mean_kl": kl.sum(-1).mean().item(),
        "top1_agreement": (fp8.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
