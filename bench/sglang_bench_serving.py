"""Run SGLang's own `python -m sglang.bench_serving` (sglang 0.5.23) unchanged,
from the .venv-sglang environment that `make sglang-bench-env` builds.

Why a wrapper: sglang.bench_serving imports sglang.srt on its way in, and one of
those modules imports torchvision at import time, which the client never uses.
No torchvision wheel here imports against a CPU torch, so the import is met by
an empty stand-in module. transformers and datasets read torchvision's
availability when they are imported; they are imported first, so they still
see that it is absent.

    .venv-sglang/bin/python bench/sglang_bench_serving.py --backend sglang \\
        --base-url http://127.0.0.1:30000 --dataset-name random-ids --tokenizer <folder> ...
"""

import runpy
import sys
import types

import datasets.config  # noqa: F401  (reads torchvision's availability at import)
import transformers.utils.import_utils as transformers_imports

assert not transformers_imports.is_torchvision_available(), "a real torchvision is installed: run sglang directly"


class _Inert:
    """Whatever the importing module takes from torchvision at import time."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> "_Inert":
        return _Inert()

    def __getattr__(self, name: str) -> "_Inert":
        return _Inert()


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


for module in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
    sys.modules[module] = _StandIn(module)

sys.argv = ["sglang.bench_serving", *sys.argv[1:]]
runpy.run_module("sglang.bench_serving", run_name="__main__")
