"""Checkpoint names -> model parameters: loading and reading weights by their
Hugging Face names.

A model class declares, as data, how its checkpoint differs from its own
parameters (see LlamaForCausalLM):

- `STACKED_PARAMS`: checkpoint projection -> (merged module, shard): q/k/v
  into qkv_proj, gate/up into gate_up_proj (MergedLinear).
- `EXPERT_PARAMS`: per-expert projection -> shard of a FusedMoE (gate, up, down).
- `CHECKPOINT_RENAMES`: (their name part, ours) where a family names a module
  differently.
- `CHECKPOINT_FUSED_EXPERTS`: the checkpoint stores each layer's experts fused
  (GPT-OSS; split here by fused_experts.py).
- `CHECKPOINT_EXTRA_LAYERS`: layers past config.num_hidden_layers are skipped
  (DeepSeek-V3's multi-token-prediction layer).
- `CHECKPOINT_IGNORED_PREFIXES`: checkpoint weights the model does not read
  (an EAGLE head's copy of the target's embedding, which it shares instead).

The functions here apply those maps; the model files hold model math only.

Tensor and expert parallelism: the stream always carries full checkpoint
tensors (or lazy safetensors slices, hf_weights.py); each parameter knows the
slice it keeps (`shard_slice`, layers/sharding.py; MergedLinear and FusedMoE
know theirs per part and per expert), so every rank loads only its shard with
the same call, at start and in a weight update. Experts another
expert-parallel rank holds are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Set, Tuple

import torch
from torch import nn

from radixserve.layers.linear import MergedLinear
from radixserve.layers.moe.layer import FusedMoE
from radixserve.layers.sharding import copy_checkpoint_tensor
from radixserve.model_loader.fused_experts import fused_expert_weight, match_fused_experts, split_fused_experts

# Buffers some checkpoints carry that we recompute.
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

_EXPERT_WEIGHT = re.compile(
    r"^(?P<owner>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<kind>weight|bias|weight_scale)$")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")

WeightStream = Iterable[Tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class ExpertWeightName:
    """A per-expert checkpoint name, e.g. model.layers.3.mlp.experts.7.up_proj.weight."""

    module: str  # the FusedMoE module: model.layers.3.mlp.experts
    expert: int
    shard: str  # gate | up | down
    kind: str  # weight | bias | weight_scale (a block-FP8 expert's scales)


def parse_expert_weight_name(name: str, expert_params: Dict[str, str]) -> Optional[ExpertWeightName]:
    match = _EXPERT_WEIGHT.match(name)
    if match is None or match["proj"] not in expert_params:
        return None
    return ExpertWeightName(match["owner"], int(match["expert"]), expert_params[match["proj"]], match["kind"])


def load_weights(model: nn.Module, weights: WeightStream, *, strict: bool = True) -> None:
    """Fill the model's parameters from (Hugging Face name, tensor) pairs.

    strict: every parameter (each shard of a merged one, each expert's shards)
    must be given; pass False to update only some of them (live weight updates).
    """
    params = dict(model.named_parameters())  # a tied head is the embedding, listed once
    modules = dict(model.named_modules())
    pending = expected_weights(params, modules)
    for name, tensor in _checkpoint_stream(model, weights):
        filled = _load_one(model, params, modules, name, tensor)
        if filled is not None:
            pending.discard(filled)
    if strict and pending:
        missing = sorted(pending)
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"weights missing from the checkpoint: {', '.join(missing[:8])}{more}")


def get_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The current value of a checkpoint (Hugging Face) weight, e.g.
    `model.layers.0.self_attn.q_proj.weight` (a view of its merged parameter;
    a copy in the checkpoint's layout for a fused-experts name).

    Under tensor parallelism this is this rank's shard (its heads, columns,
    vocab slice); an expert another expert-parallel rank holds raises
    ValueError. Which rank's answer a caller sees is the scheduler's choice."""
    modules = dict(model.named_modules())
    if getattr(model, "CHECKPOINT_FUSED_EXPERTS", False) and match_fused_experts(name):
        return fused_expert_weight(modules, name)
    name = _our_name(model, name)
    if getattr(model, "tied", False) and name == "lm_head.weight":
        name = "model.embed_tokens.weight"
    params = dict(model.named_parameters())
    if name in params:
        return params[name].data
    expert = parse_expert_weight_name(name, model.EXPERT_PARAMS)
    experts = modules.get(expert.module) if expert else None
    if isinstance(experts, FusedMoE):
        return experts.shard_view(expert.expert, expert.shard, expert.kind)
    prefix, _, kind = name.rpartition(".")
    owner, _, proj = prefix.rpartition(".")
    merged, shard = model.STACKED_PARAMS.get(proj, (None, None))
    module = modules.get(f"{owner}.{merged}")
    if not isinstance(module, MergedLinear) or getattr(module, kind, None) is None:
        raise ValueError(f"unknown weight name {name!r} for {type(model).__name__}")
    offset, size = module.shard_offsets[shard]
    return getattr(module, kind).data[offset:offset + size]


def checkpoint_weight_owner(model: nn.Module, modules: Dict[str, nn.Module], name: str) -> Optional[nn.Module]:
    """The module a checkpoint weight (Hugging Face name) loads into: its
    merged projection for q/k/v or gate/up, its FusedMoE for an expert's, None
    for an unknown name. `modules`: dict(model.named_modules())."""
    name = _our_name(model, name)
    expert = parse_expert_weight_name(name, model.EXPERT_PARAMS)
    if expert is not None and expert.module in modules:
        return modules[expert.module]
    owner, _, proj = name.rpartition(".")[0].rpartition(".")
    if proj in model.STACKED_PARAMS:
        merged = modules.get(f"{owner}.{model.STACKED_PARAMS[proj][0]}")
        if merged is not None:
            return merged
    return modules.get(name.rpartition(".")[0])


def expected_weights(params: Dict[str, nn.Parameter], modules: Dict[str, nn.Module]) -> Set[str]:
    """Names to fill: plain parameters, `name:shard` for each shard of a merged
    one, and `experts:index:shard.kind` for each expert of a FusedMoE."""
    expected: Set[str] = set()
    for name in params:
        owner_name, _, param_name = name.rpartition(".")
        owner = modules[owner_name]
        if isinstance(owner, FusedMoE):
            shards = ("down",) if param_name.startswith("w2") else ("gate", "up")
            kind = {"bias": "bias", "scale": "weight_scale"}.get(param_name.rpartition("_")[2], "weight")
            expected.update(
                f"{owner_name}:{e}:{shard}.{kind}" for e in owner.local_expert_ids() for shard in shards
            )
        elif isinstance(owner, MergedLinear):
            expected.update(f"{name}:{shard}" for shard in owner.shard_offsets)
        else:
            expected.add(name)
    return expected


def _checkpoint_stream(model: nn.Module, weights: WeightStream) -> Iterator[Tuple[str, torch.Tensor]]:
    """The stream under our names: extra layers dropped, fused experts split,
    renames applied, recomputed buffers and a tied head skipped."""
    if getattr(model, "CHECKPOINT_FUSED_EXPERTS", False):
        weights = split_fused_experts(weights)
    tied = getattr(model, "tied", False)
    headless = hasattr(model, "lm_head") and model.lm_head is None  # an embedding model
    for name, tensor in weights:
        if headless and not name.startswith(("model.", "lm_head.")):
            name = "model." + name  # saved from the bare decoder (Qwen3-Embedding): no "model." prefix
        if is_extra_layer(model, name) or name.startswith(getattr(model, "CHECKPOINT_IGNORED_PREFIXES", ())):
            continue
        name = _our_name(model, name)
        if name.endswith(IGNORED_WEIGHT_SUFFIXES) or (tied and name == "lm_head.weight") \
                or (headless and name.startswith("lm_head.")):
            continue
        yield name, tensor


def _load_one(model: nn.Module, params: Dict[str, nn.Parameter], modules: Dict[str, nn.Module],
              name: str, tensor: torch.Tensor) -> str:
    """Copy one tensor into place; returns the key it fills in expected_weights."""
    expert = parse_expert_weight_name(name, model.EXPERT_PARAMS)
    if expert is not None and isinstance(modules.get(expert.module), FusedMoE):
        modules[expert.module].load_expert(expert.expert, expert.shard, expert.kind, tensor)
        return f"{expert.module}:{expert.expert}:{expert.shard}.{expert.kind}"
    prefix, _, kind = name.rpartition(".")
    owner, _, proj = prefix.rpartition(".")
    if proj in model.STACKED_PARAMS:
        merged, shard = model.STACKED_PARAMS[proj]
        module = modules.get(f"{owner}.{merged}")
        if isinstance(module, MergedLinear):
            module.load_shard(shard, kind, tensor)
            return f"{owner}.{merged}.{kind}:{shard}"
    if name not in params:
        raise ValueError(f"unexpected weight {name!r} for {type(model).__name__}")
    param = params[name]
    copy_checkpoint_tensor(param.data, tensor, getattr(param, "shard_slice", None), f"weight {name!r}")
    return name


def _our_name(model: nn.Module, checkpoint_name: str) -> str:
    for theirs, ours in getattr(model, "CHECKPOINT_RENAMES", ()):
        checkpoint_name = checkpoint_name.replace(theirs, ours)
    return checkpoint_name


def is_extra_layer(model: nn.Module, checkpoint_name: str) -> bool:
    """A weight of a layer past config.num_hidden_layers that the model skips
    (CHECKPOINT_EXTRA_LAYERS: DeepSeek-V3's multi-token-prediction layer)."""
    if not getattr(model, "CHECKPOINT_EXTRA_LAYERS", False):
        return False
    return _layer_index(checkpoint_name, default=-1) >= model.config.num_hidden_layers


def _layer_index(name: str, default: int) -> int:
    match = _LAYER_INDEX.match(name)
    return int(match[1]) if match else default
