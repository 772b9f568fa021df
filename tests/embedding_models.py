"""Random-weight embedding checkpoints laid out as sentence-transformers
saves them (a decoder plus modules.json and 1_Pooling/config.json), and
transformers' own pooling of their hidden states: the reference the
embedding tests and bench/embedding_compare.py measure against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, List

import torch

ST_POOLING_KEYS = {"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens"}


def save_embedding_model(config: Any, out_dir: Path, pooling: str, tokenizer_dir: Path,
                         bare_decoder: bool) -> Path:
    """bare_decoder: save the model without its LM head and without the
    "model." prefix (Qwen3-Embedding's layout); else a causal LM checkpoint."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    cls = AutoModel if bare_decoder else AutoModelForCausalLM
    cls.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out_dir / f.name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out_dir / "modules.json").write_text(json.dumps(modules))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    flags = {key: key == ST_POOLING_KEYS[pooling] for key in ST_POOLING_KEYS.values()}
    (out_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": config.hidden_size, **flags}))
    return out_dir


def load_hf_encoder(path: Path):
    """The checkpoint's decoder in transformers (AutoModel: final-normed hidden states)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_embeddings(encoder: Any, prompts: List[List[int]], pooling: str) -> List[torch.Tensor]:
    """transformers' pooling of each prompt's last hidden states, L2-normalized."""
    vectors = []
    for ids in prompts:
        hidden = encoder(torch.tensor([ids])).last_hidden_state[0]
        pooled = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
        vectors.append(torch.nn.functional.normalize(pooled, dim=-1))
    return vectors


def cosine(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
