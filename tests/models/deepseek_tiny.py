"""Tiny random DeepSeek-V2/V3 checkpoints built with transformers, and a
teacher-forced run of our ModelRunner through chunked extends and decode steps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import torch

# Non-power-of-two and unequal head dims (nope 16, rope 8, v 24, latent 40)
# catch mixed-up splits and masks.
MLA_DIMS = dict(kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24)
COMMON = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
    n_routed_experts=8, n_group=4, topk_group=2, tie_word_embeddings=False, **MLA_DIMS,
)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
            mscale=0.9, mscale_all_dim=0.8, beta_fast=32, beta_slow=1)


def deepseek_config(family: str, vocab_size: int, **overrides):
    from transformers import DeepseekV2Config, DeepseekV3Config

    if family == "v2":
        # V2-Lite style: q straight from the hidden state; softmax routing limited
        # to the best 2 of 4 groups; every layer MoE.
        return DeepseekV2Config(**{**COMMON, **dict(
            vocab_size=vocab_size, num_hidden_layers=2, q_lora_rank=None, n_shared_experts=2,
            num_experts_per_tok=2, topk_method="group_limited_greedy", first_k_dense_replace=0,
            routed_scaling_factor=1.5, norm_topk_prob=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0)), **overrides})
    # V3: low-rank q, sigmoid routing with a correction bias, one dense layer
    # first, YaRN with mscale_all_dim (softmax scale correction).
    return DeepseekV3Config(**{**COMMON, **dict(
        vocab_size=vocab_size, num_hidden_layers=3, q_lora_rank=48, n_shared_experts=1,
        num_experts_per_tok=3, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=YARN), **overrides})


@torch.no_grad()
def build_deepseek(family: str, vocab_size: int, out: Path, tokenizer_dir: Optional[Path] = None, **overrides):
    """Save a random float32 model; norms and V3's e_score_correction_bias are
    randomised too (transformers sets them to one and zero, which would hide
    loading mistakes). Returns the transformers model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(deepseek_config(family, vocab_size, **overrides), dtype=torch.float32)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn_like(b))
    model.save_pretrained(out, max_shard_size="1MB")  # sharded, as big checkpoints are
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, Path(out) / f.name)
    return model.eval()


@torch.no_grad()
def teacher_forced_logits(runner, sequences: Sequence[List[int]], chunks: Sequence[int], decode_steps: int):
    """Run each sequence through our runner as the scheduler would: extends of
    `chunks[i]` new tokens per request (each on top of the previous ones' KV),
    then `decode_steps` one-token decode steps, all requests batched. Returns
    every position's logits per sequence, [len(seq), vocab]."""
    from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

    pools, dev = runner.pools, runner.device
    rows = [pools.req_to_token_pool.alloc() for _ in sequences]
    slots = [pools.allocator.alloc_extend([0], [len(s)], [0]) for s in sequences]
    for row, s in zip(rows, slots):
        pools.req_to_token_pool.req_to_token[row, : len(s)] = s
    steps = [("extend", n) for n in chunks] + [("decode", 1)] * decode_steps
    done, logits = [0] * len(sequences), [[] for _ in sequences]
    for mode, n in steps:
        new = [min(n, len(s) - d) for s, d in zip(sequences, done)]
        ids = torch.tensor([t for s, d, k in zip(sequences, done, new) for t in s[d:d + k]], device=dev)
        fb = ForwardBatch(
            forward_mode=ForwardMode.EXTEND if mode == "extend" else ForwardMode.DECODE,
            batch_size=len(sequences), input_ids=ids,
            positions=torch.tensor([p for d, k in zip(done, new) for p in range(d, d + k)], device=dev),
            req_pool_indices=torch.tensor(rows, device=dev),
            seq_lens=torch.tensor([d + k for d, k in zip(done, new)], device=dev),
            out_cache_loc=torch.cat([s[d:d + k] for s, d, k in zip(slots, done, new)]),
            seq_lens_cpu=[d + k for d, k in zip(done, new)],
            req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool, attn_backend=runner.attn_backend,
        )
        if mode == "extend":
            fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu = list(done), new
            fb.extend_prefix_lens = torch.tensor(done, device=dev)
            fb.extend_seq_lens = torch.tensor(new, device=dev)
            fb.extend_start_loc = torch.cumsum(fb.extend_seq_lens, 0) - fb.extend_seq_lens
        else:
            assert all(k == 1 for k in new), "decode steps need one token left per sequence"
        runner.attn_backend.init_forward_metadata(fb)
        out = runner.model.compute_logits(runner.model(fb.input_ids, fb.positions, fb))
        start = 0
        for i, k in enumerate(new):
            logits[i].append(out[start:start + k])
            start += k
            done[i] += k
    for row, s in zip(rows, slots):
        pools.req_to_token_pool.free(row)
        pools.allocator.free(s)
    return [torch.cat(parts) for parts in logits]
