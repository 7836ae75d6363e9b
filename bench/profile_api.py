"""uvicorn under cProfile, for `python -m bench.api --profile FILE`.

    python -m bench.profile_api FILE [uvicorn's own arguments]

FastAPI runs sync routes on a thread pool, and one cProfile profiler cannot follow several
threads, so every thread gets its own profiler timed by that thread's CPU clock
(`time.thread_time`); when the server stops they are merged into FILE for `pstats`.
"""

from __future__ import annotations

import cProfile
import pstats
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import uvicorn

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _profile_this_thread() -> None:
    profile = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(profile)
    profile.enable()


def _first_event(_frame: FrameType, _event: str, _arg: Any) -> None:
    # Installed by `threading.setprofile` in every new thread; hands over to a real profiler.
    sys.setprofile(None)
    _profile_this_thread()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target, uvicorn_args = args[0], args[1:]
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # handlers that would end the process before the stats are written.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    threading.setprofile(_first_event)
    _profile_this_thread()
    try:
        uvicorn.main.main(args=uvicorn_args, standalone_mode=False)
    finally:
        threading.setprofile(None)
        merged: pstats.Stats | None = None
        for profile in list(_profiles):
            profile.disable()
            stats = pstats.Stats(profile)
            merged = stats if merged is None else merged.add(stats)
        if merged is not None:
            merged.dump_stats(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
