"""A decode step's CUDA-graph replay, an older commit against this tree, in one run (needs CUDA and git).

    python bench/replay_ab.py --base REV --tokenizer-dir DIR [--models a,b] [--rounds 2] [--out F.json] [key=value ...]
    python bench/replay_ab.py --base REV --base-tree DIR ...   # DIR: `git archive REV src bench` unpacked

For each round and model, `bench/profile_decode.py` runs from `git archive REV`
and from this tree, one after the other, in fresh processes on the same GPU;
the key=value pairs pass through to it (batch=, context=, quantization=...).
A graph replay is a mean over 50 replays of one step: on an H100 the same
commit's replays agreed within 0.003 ms where gpu_compare's batch-1 decode of
one commit moved by 7% between runs, so this is the measure to compare two
commits' batch-1 steps by. Prints a table (medians over the rounds) and writes
every run to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]


def export_commit(rev: str, dest: Path) -> Path:
    """src/ and bench/ of commit `rev` under dest."""
    archive = dest / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "src", "bench"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def profile(tree: Path, model: str, tokenizer_dir: str, extra: List[str], out: Path) -> Dict:
    """profile_decode.py of `tree` in a process of its own (it puts its tree's
    src/ first on the path): the JSON head of its report."""
    subprocess.run([sys.executable, str(tree / "bench" / "profile_decode.py"), str(out), tokenizer_dir, model, *extra],
                   check=True, stdout=subprocess.DEVNULL)
    head, _ = json.JSONDecoder().raw_decode(out.read_text())
    return head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare this tree against")
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--models", default="llama8b", help="bench_shapes names, comma-separated")
    p.add_argument("--base-tree", help="REV's src/ and bench/ exported beforehand, for a copy without git history")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="where to write every run as JSON")
    args, extra = p.parse_known_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base_tree) if args.base_tree else export_commit(args.base, Path(tmp))
        trees = {"base": base, "this tree": ROOT}
        for rnd in range(args.rounds):
            for model in args.models.split(","):
                for label, tree in trees.items():
                    head = profile(tree, model, args.tokenizer_dir, extra, Path(tmp) / "profile.txt")
                    runs.append({"round": rnd, "model": model, "tree": label, **head})
                    print(json.dumps(runs[-1]), flush=True)
    print(f"| model | {args.base} replay ms | this tree | change | kernels a step |")
    print("| --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        ms = {label: statistics.median(r["graph_replay_ms"] for r in runs if r["model"] == model and r["tree"] == label)
              for label in ("base", "this tree")}
        kernels = [next(r["kernels_per_step"] for r in runs if r["model"] == model and r["tree"] == label)
                   for label in ("base", "this tree")]
        print(f"| {model} | {ms['base']:.3f} | {ms['this tree']:.3f} | {ms['this tree'] / ms['base'] - 1:+.1%} "
              f"| {kernels[0]:.0f} -> {kernels[1]:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"base": args.base, "extra": extra, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
