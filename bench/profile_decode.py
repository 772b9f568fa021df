"""Where a decode step spends its time (needs CUDA).

    python bench/profile_decode.py OUT.txt TOKENIZER_DIR [MODEL [key=value ...]]

MODEL is a bench_shapes name (default llama8b); key=value pairs are ServerArgs
fields (quantization=fp8), plus `batch` (decode batch size, default 1) and
`context` (tokens of each request before the step, default 256). GPU time of
one decode CUDA-graph replay, of the eager forward, of the matmuls alone (every
bfloat16 weight as a cuBLAS product in one loop, at the batch's rows), and a
per-kernel profile of the replay with the kernel count per step.

On Hopper the decode kernels launch with programmatic dependent launch: a
kernel starts early and waits, and the profile counts that wait as its time,
so the per-kernel times overlap and do not add up to the replay. With
RADIXSERVE_DISABLE_PDL=1 they add up again (at PDL-off's step time).

`prefill=1` profiles the prefill instead: one eager forward of `batch`
prompts of `context` tokens each (16 x 512 is one 8,192-token chunk of
gpu_compare's offline run), the matmuls alone at as many rows, the kernels.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shapes import model_config
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.managers.schedule_policy import PrefillAdder
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.sampling.sampling_params import SamplingParams
from radixserve.server_args import ServerArgs



def cuda_ms(fn, iters: int = 50) -> float:
    """Mean GPU milliseconds per call, timed with CUDA events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters): fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters



def bf16_weights(model: torch.nn.Module, skip: tuple = ("embed",)) -> list:
    """Every 2-D bfloat16 weight of the model but those whose module name holds
    a `skip` word (the embedding is only looked up)."""
    return [m.weight for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
            and m.weight.dtype == torch.bfloat16 and not any(word in n for word in skip)]


def kernel_table(fn, calls: int):
    """(kernels per call, the profiler's table) over `calls` calls of fn."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    count = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA") / calls
    return count, prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def profile_prefill(runner, fb, batch_size: int, context: int) -> None:
    """prefill=1: one eager prefill of batch x context tokens (what a chunk of an
    offline run is), the matmuls alone at as many rows, and its kernel table."""
    tokens = batch_size * context
    res = {"prefill_requests": batch_size, "prompt_len": context, "tokens": tokens}
    res["prefill_forward_ms"] = cuda_ms(lambda: runner.forward(fb), 5)
    ws = bf16_weights(runner.model, skip=("embed", "lm_head"))  # the LM head sees each request's last row only
    x = {w.shape[1]: torch.randn(tokens, w.shape[1], dtype=torch.bfloat16, device=fb.input_ids.device) for w in ws}
    res["matmuls_only_ms"] = cuda_ms(lambda: [F.linear(x[w.shape[1]], w) for w in ws], 5)
    res["matmul_TFLOP"] = sum(2 * tokens * w.numel() for w in ws) / 1e12
    res["kernels_per_forward"], table = kernel_table(lambda: runner.forward(fb), 3)
    print(table)
    print(json.dumps(res, indent=1))
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1) + "\n" + table)


def decode_setup(name: str, tokenizer_dir: str, extra: dict, batch_size: int, context: int):
    """A ModelRunner of bench_shapes model `name` (dummy weights; `extra`:
    ServerArgs fields) and a ScheduleBatch of batch_size requests of `context`
    prompt tokens each, prepared for their prefill."""
    d = Path(f"/tmp/profile_{name}")
    d.mkdir(exist_ok=True)
    model_config(name, smoke=False).save_pretrained(d)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, d / f.name)
    tokens = batch_size * (context + 8)
    args = {"max_total_tokens": max(tokens, 1 << 14), "max_running_requests": max(batch_size, 8),
            "cuda_graph_max_bs": max(batch_size, 8), **extra}
    runner = ModelRunner(ServerArgs(model_path=str(d), load_format="dummy", dtype="bfloat16", **args))
    sp = SamplingParams.from_dict({"max_new_tokens": 2})
    sp.normalize()
    reqs = [Req(TokenizedGenerateReqInput(rid=str(i), input_ids=[100 + (i + j) % 1000 for j in range(context)],
                                          sampling_params=sp), sampling_seed=0) for i in range(batch_size)]
    adder = PrefillAdder(max(tokens, 1 << 14), [], 0.7, 1, None, tokens)
    for req in reqs:
        adder.add(req)
    batch = ScheduleBatch(reqs, runner.pools, runner.device)
    batch.prepare_for_extend(adder.plans)
    return runner, batch


def decode_step(runner, batch):
    """The batch's prefill run, then its first decode step's ForwardBatch."""
    out = runner.forward(batch.to_forward_batch())
    batch.last_token_ids = out.next_token_logits.argmax(-1)
    batch.prepare_for_decode()
    return batch.to_forward_batch()


def main() -> None:
    name = sys.argv[3] if len(sys.argv) > 3 else "llama8b"
    extra = dict(arg.split("=", 1) for arg in sys.argv[4:])
    batch_size, context = int(extra.pop("batch", 1)), int(extra.pop("context", 256))
    prefill = extra.pop("prefill", "0") == "1"
    runner, batch = decode_setup(name, sys.argv[2], extra, batch_size, context)
    if prefill:
        profile_prefill(runner, batch.to_forward_batch(), batch_size, context)
        return
    fb = decode_step(runner, batch)
    res = {"batch": batch_size, "context": context}
    res["graph_replay_ms"] = cuda_ms(lambda: runner.graph_runners[0].replay(fb))
    fb.attn_backend = runner.attn_backend
    runner.attn_backend.init_forward_metadata(fb)
    res["eager_forward_ms"] = cuda_ms(lambda: runner.model.compute_logits(runner.model(fb.input_ids, fb.positions, fb)), 10)
    # The matmuls alone, weights read once each (cuBLAS), in one graph.
    ws = bf16_weights(runner.model)
    x = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=torch.bfloat16, device="cuda") for w in ws}
    # cuBLAS's handle is made on first use, which a capture may not do (in
    # deterministic mode no layer has called cuBLAS yet).
    F.linear(x[ws[0].shape[1]], ws[0])
    gemv = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gemv):
        for w in ws:
            F.linear(x[w.shape[1]], w)
    res["matmuls_only_graph_ms"] = cuda_ms(gemv.replay)
    res["weight_GB"] = sum(w.numel() for w in ws) * 2 / 1e9
    res["kernels_per_step"], table = kernel_table(lambda: runner.graph_runners[0].replay(fb), 5)
    print(table)
    print(json.dumps(res, indent=1))
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1) + "\n" + table)

if __name__ == "__main__":
    main()
