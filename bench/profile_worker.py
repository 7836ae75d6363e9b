"""The product's Celery app with cProfile switched on in every pool process and the parent.

    celery -A bench.profile_worker worker ...   (with BENCH_PROFILE_DIR set)

Each pool process profiles itself (in CPU time) from `worker_process_init` until it exits, the
parent (which holds ETA messages and feeds the pool) from `worker_ready` until shutdown; each
writes `<BENCH_PROFILE_DIR>/<role>-<pid>.prof` for `pstats`. Nothing in the product changes.
"""

from __future__ import annotations

import cProfile
import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import signals

from workers.celery_app import app

__all__ = ["app"]

_profiler: cProfile.Profile | None = None


def _begin(role: str) -> None:
    global _profiler
    sys.setprofile(None)  # a forked child must not keep the parent's profiler
    # CPU time, not wall time: the question is what the processes spend their cores on.
    _profiler = cProfile.Profile(time.process_time)
    _profiler.enable()
    os.environ["BENCH_PROFILE_ROLE"] = role


def _end() -> None:
    if _profiler is None:
        return
    _profiler.disable()
    target = Path(os.environ.get("BENCH_PROFILE_DIR", "."))
    target.mkdir(parents=True, exist_ok=True)
    role = os.environ.get("BENCH_PROFILE_ROLE", "process")
    _profiler.dump_stats(str(target / f"{role}-{os.getpid()}.prof"))


@signals.worker_ready.connect
def _parent_begins(**_: Any) -> None:
    _begin("parent")


@signals.worker_shutdown.connect
def _parent_ends(**_: Any) -> None:
    _end()


@signals.worker_process_init.connect
def _child_begins(**_: Any) -> None:
    _begin("child")


@signals.worker_process_shutdown.connect
def _child_ends(**_: Any) -> None:
    _end()
