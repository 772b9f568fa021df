"""Where FP8 weights' logit error comes from: each group of linears rounded alone.

    python bench/fp8_layer_sensitivity.py [--prompts 40] [--model-path SmolLM2-135M-Instruct] [--out f.jsonl]

The reference is the unquantized model in bfloat16 (the dtype FP8's accuracy
target is stated against), teacher-forced over the first N doc lines of
bench/quant_accuracy.py. Then the weights of one group of linears at a time
(all of them; one kind: qkv, o_proj, gate_up, down; one decoder layer) are
rounded to float8 E4M3 with one scale per output row, as `--quantization fp8`
rounds them, and put back in bfloat16: activations stay exact, so each row
measures what that group's weight rounding alone costs. Printed and written
per group: the relative L2 error of the logits and the top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from quant_accuracy import doc_prompts, runner_logits  # noqa: E402
from radixserve.layers.linear import Linear  # noqa: E402
from radixserve.layers.quantization import FP8  # noqa: E402
from radixserve.model_executor.model_runner import ModelRunner  # noqa: E402
from radixserve.model_loader.source import resolve_model_source  # noqa: E402
from radixserve.server_args import ServerArgs  # noqa: E402
from radixserve.utils.hf_utils import load_tokenizer  # noqa: E402

KINDS = ("qkv", "o_proj", "gate_up", "down")


def all_logits(runner: ModelRunner, ids: List[List[int]]) -> torch.Tensor:
    return torch.cat(runner_logits(runner, ids))


def fp8_rounded(weight: torch.Tensor) -> torch.Tensor:
    """The weight as --quantization fp8 holds it (its format's own quantize), back in its dtype."""
    return FP8.dequantize(*FP8.quantize(weight)).to(weight.dtype)


def groups(names: Iterable[str]) -> Dict[str, List[str]]:
    """all, each kind of projection, each decoder layer -> the linears' names."""
    names = list(names)
    out = {"all": names}
    out.update({kind: [n for n in names if kind in n] for kind in KINDS})
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n})
    out.update({f"layer {i}": [n for n in names if f".layers.{i}." in n] for i in layers})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--out")
    args = p.parse_args()
    tokenizer = load_tokenizer(resolve_model_source(args.model_path))
    ids = [tokenizer.encode(text)[:128] for text in doc_prompts(args.prompts)]
    runner = ModelRunner(ServerArgs(model_path=args.model_path, device="cpu", dtype="bfloat16", max_total_tokens=4096))
    reference = all_logits(runner, ids)
    linears = {n: m for n, m in runner.model.named_modules() if isinstance(m, Linear)}
    rows = []
    for group, names in groups(linears).items():
        originals = {n: linears[n].weight.data.clone() for n in names}
        for n in names:
            linears[n].weight.data.copy_(fp8_rounded(originals[n]))
        logits = all_logits(runner, ids)
        for n in names:
            linears[n].weight.data.copy_(originals[n])
        row = {"group": group, "linears": len(names), "positions": reference.shape[0],
               "rel_l2": ((logits - reference).norm() / reference.norm()).item(),
               "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
