"""LoRA adapters made with PyPI peft on the tiny random models, and
transformers + peft as the reference for their outputs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pytest
import torch

from tests.conftest import hf_greedy, load_hf_model


def make_adapter(base: Path, out: Path, rank: int, targets: List[str], seed: int, alpha: Optional[int] = None,
                 rslora: bool = False) -> Path:
    """A PEFT adapter on the base model with random A and random non-zero B
    (PEFT starts B at zero, which would change nothing), saved as PEFT does."""
    from peft import LoraConfig, get_peft_model

    model = load_hf_model(base)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, lora_dropout=0.0,
                        use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    peft_model.save_pretrained(out)
    return out


def reference_greedy(base: Path, adapter: Optional[Path], prompts: list, new_tokens: int) -> list:
    """transformers (+ peft when adapter is given): greedy continuations."""
    from peft import PeftModel

    model = load_hf_model(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return hf_greedy(model, prompts, new_tokens)


@pytest.fixture(scope="session")
def lora_setup(tiny_model_factory, tmp_path_factory):
    """Per architecture: the base model and three adapters of different ranks
    and targets (attention only; MLP and q/v; everything with rsLoRA)."""
    built = {}

    def get(arch: str) -> dict:
        if arch not in built:
            base = tiny_model_factory(arch)
            root = tmp_path_factory.mktemp(f"lora-{arch}")
            built[arch] = {
                "base": base,
                "attn": make_adapter(base, root / "attn", 4, ["q_proj", "k_proj", "v_proj", "o_proj"], 1),
                "mlp": make_adapter(base, root / "mlp", 8, ["gate_proj", "up_proj", "down_proj", "q_proj",
                                                             "v_proj"], 2),
                "all": make_adapter(base, root / "all", 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"], 3, alpha=4, rslora=True),
            }
        return built[arch]

    return get
