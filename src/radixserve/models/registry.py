"""Architecture name -> model class. A new family is one file plus a line here."""

from __future__ import annotations

from typing import Any, Dict, List

from radixserve.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from radixserve.models.gpt_oss import GptOssForCausalLM
from radixserve.models.llama import LlamaForCausalLM, MistralForCausalLM
from radixserve.models.llama_eagle import LlamaForCausalLMEagle
from radixserve.models.llama_eagle3 import LlamaForCausalLMEagle3
from radixserve.models.mixtral import MixtralForCausalLM
from radixserve.models.qwen2 import Qwen2ForCausalLM
from radixserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from radixserve.models.qwen2_vl import Qwen2VLForConditionalGeneration
from radixserve.models.qwen3 import Qwen3ForCausalLM
from radixserve.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

ARCHITECTURES: Dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    # Bare decoders (no LM head), as embedding checkpoints are saved: --is-embedding only.
    "LlamaModel": LlamaForCausalLM,
    "Qwen2Model": Qwen2ForCausalLM,
    "Qwen3Model": Qwen3ForCausalLM,
    "LlamaForCausalLMEagle": LlamaForCausalLMEagle,  # draft heads (speculative decoding)
    "LlamaForCausalLMEagle3": LlamaForCausalLMEagle3,
}

# Configs without `architectures` (those read from GGUF metadata) name only a model_type.
MODEL_TYPES: Dict[str, type] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "gpt_oss": GptOssForCausalLM,
    "deepseek_v2": DeepseekV2ForCausalLM,
    "deepseek_v3": DeepseekV3ForCausalLM,
}


def supported_architectures() -> List[str]:
    return sorted(ARCHITECTURES)


def get_model_class(config: Any) -> type:
    """The model class for `config.architectures`, else for `config.model_type`.

    A config that names architectures is taken at its word: an unsupported
    head (say LlamaForSequenceClassification) is refused, not served as a
    causal LM because its model_type is known.
    """
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = getattr(config, "model_type", None)
    if not names and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    asked = ", ".join(names) if names else f"model_type {model_type!r}"
    raise ValueError(
        f"unsupported architecture {asked}; supported: {', '.join(supported_architectures())}"
    )
