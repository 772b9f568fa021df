"""The scheduler: a loop (core.Scheduler) over parts that own their state; see docs/scheduler.md."""

from radixserve.managers.scheduler.core import Scheduler
from radixserve.managers.scheduler.process import run_scheduler_process

__all__ = ["Scheduler", "run_scheduler_process"]
