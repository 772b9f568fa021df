"""Storage I/O off the scheduler's thread: prefetches for arriving requests and
write-backs of pages that reached the host pool.

Each direction has its own daemon worker, so a slow write never holds a read
back, and a backend that hangs never blocks the scheduler (nor the process's
exit). A backend that raises ends the job: a prefetch then yields the pages
it had (a prefix, maybe empty) and the request recomputes the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List

import torch

from radixserve.mem_cache.hicache.storage import HiCacheStorage

logger = logging.getLogger(__name__)

GET_BATCH_PAGES = 8  # pages per batch_get: a best-effort prefetch can use what arrived so far


@dataclass
class Prefetch:
    """Pages [first_page, first_page + len(pages)) of one request's prompt, from storage."""

    keys: List[str]
    first_page: int
    deadline: float  # time.monotonic() after which the timeout policy stops waiting
    pages: List[torch.Tensor] = field(default_factory=list)  # flat uint8, in order
    done: bool = False
    cancelled: bool = False


class Worker:
    """One daemon thread running submitted callables in order."""

    def __init__(self, name: str) -> None:
        self.jobs: "queue.Queue[Callable[[], None]]" = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception:  # the job records its own failure; never let the worker die
                logger.exception("HiCache storage job failed")


class StorageIO:
    def __init__(self, storage: HiCacheStorage) -> None:
        self.storage = storage
        self.reader = Worker("hicache-prefetch")
        self.writer = Worker("hicache-write")
        self.pages_written = 0
        self.pages_read = 0
        self.errors = 0

    def prefetch(self, keys: List[str], first_page: int, timeout_s: float) -> Prefetch:
        job = Prefetch(keys, first_page, time.monotonic() + timeout_s)
        self.reader.submit(lambda: self._fetch(job))
        return job

    def _fetch(self, job: Prefetch) -> None:
        try:
            found = self.storage.batch_exists(job.keys)
            for start in range(0, found, GET_BATCH_PAGES):
                if job.cancelled:
                    break
                values = self.storage.batch_get(job.keys[start:min(start + GET_BATCH_PAGES, found)])
                for value in values:
                    if value is None:
                        return
                    job.pages.append(value)
                    self.pages_read += 1
        except Exception as e:
            self.errors += 1
            logger.warning("HiCache storage read failed (the request recomputes): %r", e)
        finally:
            job.done = True

    def write(self, keys: List[str], values: List[torch.Tensor], on_done: Callable[[], None]) -> None:
        def job() -> None:
            try:
                missing = [i for i, k in enumerate(keys) if not self.storage.exists(k)]
                if missing:
                    self.storage.batch_set([keys[i] for i in missing], [values[i] for i in missing])
                self.pages_written += len(missing)
                on_done()
            except Exception as e:
                self.errors += 1
                logger.warning("HiCache storage write failed (pages stay uncached): %r", e)

        self.writer.submit(job)

    def clear(self) -> None:
        """Forget the storage's pages, after the writes already queued."""
        done = threading.Event()

        def job() -> None:
            try:
                self.storage.clear()
            finally:
                done.set()

        self.writer.submit(job)
        done.wait(timeout=30)
