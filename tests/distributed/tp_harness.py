"""Run tiny checkpoints split over tensor/expert-parallel ranks and collect
what each rank computed, for comparison with transformers.

The device comes from RADIXSERVE_TEST_TP_DEVICE ("cpu", the default: gloo;
"cuda": NCCL, one GPU per rank, CUDA graphs on), so the multi-GPU issue reruns
the same tests unchanged. Ranks are spawned once per test module and run every
case in turn (a fresh process group per case, met through a file), each rank
writing its results to a file the test process reads back.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DEVICE = os.environ.get("RADIXSERVE_TEST_TP_DEVICE", "cpu")
VOCAB = 1001  # odd: the last rank's vocab slice has a padding row
DIST_TIMEOUT_S = 120  # a rank that dies makes the other fail, not hang


@dataclass
class TPCase:
    """One model at one (tp, ep), fed `sequences` (prompt + transformers' greedy
    continuation): each prefix in two chunked extends, then `decode_steps`
    decode steps through ModelRunner.forward."""

    name: str
    folder: str
    tp: int
    ep: int
    sequences: List[List[int]]
    decode_steps: int
    server_args: Dict = field(default_factory=dict)
    # Where a trainer's full tensors come from for the weight-update check
    # (default: `folder`; a block-FP8 checkpoint's dequantized twin).
    full_tensors_folder: Optional[str] = None


def rendezvous_file(out_dir: Path, case_index: int) -> str:
    """Where the ranks meet for one case: a file no earlier run has used (the
    parent clears the results folder; no rank deletes it, which would race)."""
    return f"file://{Path(out_dir) / f'rendezvous_{case_index}'}"


def run_ranks(cases: Sequence[TPCase], world: int, out_dir: Path) -> None:
    """Spawn `world` ranks that run every case; raises if any rank fails."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world, list(cases), str(out_dir)), nprocs=world, join=True)


def load_result(out_dir: Path, case_index: int, rank: int) -> dict:
    return torch.load(Path(out_dir) / f"case{case_index}_rank{rank}.pt")


def _rank_main(rank: int, world: int, cases: List[TPCase], out_dir: str) -> None:
    torch.set_num_threads(1)
    from radixserve.distributed import destroy_distributed

    for i, case in enumerate(cases):
        try:
            result = _run_case(rank, world, case, rendezvous_file(Path(out_dir), i))
        finally:
            destroy_distributed()
        torch.save(result, Path(out_dir) / f"case{i}_rank{rank}.pt")


@torch.inference_mode()
def _run_case(rank: int, world: int, case: TPCase, init_method: str) -> dict:
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs

    args = ServerArgs(model_path=case.folder, device=DEVICE, dtype="float32", tp_size=world, ep_size=case.ep,
                      max_total_tokens=1024, dist_timeout=DIST_TIMEOUT_S, **case.server_args)
    runner = ModelRunner(args, tp_rank=rank, dist_init_method=init_method)
    logits = chunked_then_decode_logits(runner, case.sequences, case.decode_steps)
    params = {n: p.numel() * p.element_size() for n, p in runner.model.named_parameters()}
    shard_of_o_proj = runner.get_weights_by_name("model.layers.0.self_attn.o_proj.weight", 1 << 30)
    # Batch invariance: the first sequence alone gives the bits it gave in the batch.
    alone = []
    if args.enable_deterministic_inference:
        alone = chunked_then_decode_logits(runner, case.sequences[:1], case.decode_steps)
    reloaded = _reload_from_full_tensors(runner, case)
    return {
        "alone_logits": [x.cpu() for x in alone],
        "logits": [x.cpu() for x in logits],
        "reloaded_logits": [x.cpu() for x in reloaded],
        "o_proj_shard_numel": len(shard_of_o_proj),
        "param_bytes": params,
        "max_total_num_tokens": runner.max_total_num_tokens,
        "kv_bytes_per_token": runner.kv_bytes_per_token,
        "kv_layout": dataclasses.asdict(runner.kv_layout),
    }


def _reload_from_full_tensors(runner, case: TPCase) -> List[torch.Tensor]:
    """Zero every parameter, update the weights from the checkpoint's full
    tensors (as a trainer sends them), and compute the logits again: each rank
    must have taken its own shard of every tensor."""
    from radixserve.model_loader.hf_weights import HFWeights

    for p in runner.model.parameters():
        p.data.zero_()
    runner.update_weights_from_tensor(list(HFWeights(Path(case.full_tensors_folder or case.folder))))
    return chunked_then_decode_logits(runner, case.sequences, case.decode_steps)


def _forward_batch(runner, rows, slots, done, new, decode: bool, sequences):
    from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

    dev, pools = runner.device, runner.pools
    ids = [t for s, d, k in zip(sequences, done, new) for t in s[d:d + k]]
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        batch_size=len(sequences), input_ids=torch.tensor(ids, device=dev),
        positions=torch.tensor([p for d, k in zip(done, new) for p in range(d, d + k)], device=dev),
        req_pool_indices=torch.tensor(rows, device=dev),
        seq_lens=torch.tensor([d + k for d, k in zip(done, new)], device=dev),
        out_cache_loc=torch.cat([s[d:d + k] for s, d, k in zip(slots, done, new)]),
        seq_lens_cpu=[d + k for d, k in zip(done, new)],
        req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool,
    )
    if not decode:
        fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu = list(done), list(new)
        fb.extend_prefix_lens = torch.tensor(done, device=dev)
        fb.extend_seq_lens = torch.tensor(new, device=dev)
        fb.extend_start_loc = torch.cumsum(fb.extend_seq_lens, 0) - fb.extend_seq_lens
        fb.logits_indices = torch.arange(len(ids), device=dev)  # every position's logits
        fb.last_logit_rows = torch.cumsum(fb.extend_seq_lens, 0) - 1
    return fb


def chunked_then_decode_logits(runner, sequences: Sequence[List[int]], decode_steps: int) -> List[torch.Tensor]:
    """Every position's logits [len(seq), vocab] of each sequence, computed as
    the scheduler would: the first len - decode_steps tokens in two extends
    (the second on top of the first's KV: chunked prefill), then one-token
    decode steps, all sequences batched, through the runner's own forward."""
    pools = runner.pools
    rows = [pools.req_to_token_pool.alloc() for _ in sequences]
    slots = [pools.allocator.alloc_extend([0], [len(s)], [0]) for s in sequences]
    for row, s in zip(rows, slots):
        pools.req_to_token_pool.req_to_token[row, :len(s)] = s
    prefix = [len(s) - decode_steps for s in sequences]
    plan = [[(p + 1) // 2 for p in prefix], [p // 2 for p in prefix]] + [[1] * len(sequences)] * decode_steps
    done, logits = [0] * len(sequences), [[] for _ in sequences]
    for step, new in enumerate(plan):
        decode = step >= 2
        out = runner.forward(_forward_batch(runner, rows, slots, done, new, decode, sequences))
        rows_out = out.next_token_logits if decode else out.all_logits
        start = 0
        for i, k in enumerate(new):
            logits[i].append(rows_out[start:start + k])
            start += k
            done[i] += k
    for row, s in zip(rows, slots):
        pools.req_to_token_pool.free(row)
        pools.allocator.free(s)
    return [torch.cat(parts) for parts in logits]


# ---- tiny checkpoints ----

@torch.no_grad()
def randomize_norms_and_biases(model, bias_scale: float = 0.5) -> None:
    """transformers leaves norms at one and most biases at zero, which would
    hide a norm or bias loaded on the wrong rank (or added twice)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith(("bias", "sinks")):
            p.copy_(bias_scale * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn_like(b))


def save_checkpoint(config, out: Path, gpt_oss: bool = False):
    """A random float32 transformers model of `config`, saved sharded; returns it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_norms_and_biases(model)
    if gpt_oss:  # experts large enough that the SwiGLU clamp bites
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("gate_up_proj", "down_proj"):
                    getattr(layer.mlp.experts, name).copy_(0.5 * torch.randn_like(getattr(layer.mlp.experts, name)))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, max_shard_size="1MB")  # sharded, as big checkpoints are
    return model.eval()


def save_block_fp8_checkpoint(saved: Path, fp8_dir: Path, ref_dir: Path, block: Tuple[int, int]) -> None:
    """The checkpoint in `saved` in DeepSeek-V3's block-FP8 layout (2-D
    projections as E4M3 + `_scale_inv`; norms, router, embeddings and head
    unquantized) in fp8_dir, and its dequantized values in ref_dir."""
    import json

    from safetensors.torch import save_file

    from radixserve.layers.block_fp8 import dequantize_block_fp8, quantize_block_fp8
    from radixserve.model_loader.hf_weights import HFWeights

    quantized, reference = {}, {}
    for name, tensor in HFWeights(saved):
        if tensor.dim() == 2 and not any(s in name for s in ("norm", "embed_tokens", "lm_head", "mlp.gate.")):
            q, scale = quantize_block_fp8(tensor, block)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            reference[name] = dequantize_block_fp8(q, scale, block)
        else:
            quantized[name] = reference[name] = tensor
    config = json.loads((saved / "config.json").read_text())
    for folder, tensors in ((fp8_dir, quantized), (ref_dir, reference)):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(config))


def family_configs() -> Dict[str, object]:
    """A tiny config per family, each with something the sharding can get wrong."""
    from transformers import GptOssConfig

    from tests.conftest import tiny_config
    from tests.models.deepseek_tiny import deepseek_config
    from tests.models.moe_tiny import moe_config

    llama = tiny_config("llama", VOCAB, bos=1, eos=2)
    # Qwen3 with one KV head: each rank holds a copy of it; tied embeddings.
    qwen3 = tiny_config("qwen3", VOCAB, bos=1, eos=2)
    qwen3.num_key_value_heads, qwen3.tie_word_embeddings = 1, True
    gpt_oss = GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=64),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return {
        "llama": llama, "qwen3": qwen3, "qwen3_moe": moe_config("qwen3_moe", VOCAB),
        "mixtral": moe_config("mixtral", VOCAB), "deepseek_v3": deepseek_config("v3", VOCAB),
        "deepseek_v2": deepseek_config("v2", VOCAB),  # q straight from the hidden state, 2 shared experts
        "gpt_oss": gpt_oss,
    }
