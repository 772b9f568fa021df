"""Count the Triton kernels compiled while serving.

After the start-up warm-up (model_executor/kernel_warmup.py) nothing should
compile: a compile then ran inside some request, which waited for it. The
watch counts them (in `/get_server_info`, `kernel_compiles_while_serving`)
and logs each one with its specialisation, which says what the warm-up missed.
It hooks Triton's post-compile hook, called for every variant Triton builds or
loads from its disk cache into the process, in any thread.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

logger = logging.getLogger(__name__)


class JitCompileWatch:
    def __init__(self) -> None:
        self.compiled: List[str] = []  # "module.kernel" of each compile since start()

    def start(self) -> None:
        """Count from now on. Without Triton (or its hooks) there is nothing to count."""
        try:
            from triton import knobs
        except ImportError:
            return
        previous: Optional[Any] = knobs.runtime.jit_post_compile_hook

        def on_compile(*, key: Any, repr: str, fn: Any, **kwargs: Any) -> Optional[bool]:
            self.compiled.append(f"{fn.module}.{fn.name}")
            logger.warning("Triton compiled a kernel while serving (the start-up warm-up missed it): %s", repr)
            return previous(key=key, repr=repr, fn=fn, **kwargs) if previous else None

        knobs.runtime.jit_post_compile_hook = on_compile

    @property
    def count(self) -> int:
        return len(self.compiled)
