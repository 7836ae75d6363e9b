"""Sampling profiles of running stack processes with py-spy, and a plain-text summary of them.

    with record({"worker": pid, "api": pid}, out_dir):
        ...   # the phase to profile
    print(summary(out_dir / "worker.txt"))

py-spy samples from outside the process (no code of ours runs in the target, overhead a few
percent) and follows a prefork worker's pool children with `--subprocesses`. By default it
counts only samples holding the GIL, i.e. where the Python CPU goes; `wall=True` counts every
thread's stack, waiting included, i.e. where a task's time goes. The raw format is one line
per distinct stack, `frame;frame;...;leaf count`, read back by `summary`.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

PY_SPY = Path(sys.executable).with_name("py-spy")
# Frames of the product itself, to charge library time to the product code that asked for it.
OWN_CODE = ("workers/", "api/", "config/")


def _spy(pid: int, output: Path, rate: int, wall: bool) -> subprocess.Popen[bytes]:
    # CPU: only samples holding the GIL. Wall: every thread's stack, waiting ones included.
    mode = "--idle" if wall else "--gil"
    argv = [str(PY_SPY), "record", "--pid", str(pid), "--subprocesses", mode,
            "--nonblocking", "--function", "--rate", str(rate),
            "--format", "raw", "--output", str(output)]  # fmt: skip
    with output.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)


@contextlib.contextmanager
def record(
    pids: Mapping[str, int], out_dir: Path | None, *, rate: int = 100, wall: bool = False
) -> Iterator[None]:
    """Sample each named process tree while the block runs: where its Python CPU goes, or
    with `wall` where its threads spend their time, waiting included. No `out_dir`: no
    profile, the block just runs."""
    if out_dir is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = [_spy(pid, out_dir / f"{name}.txt", rate, wall) for name, pid in pids.items()]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for spy in spies:
            spy.wait(timeout=60)


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _function(frame: str) -> str:
    # "name (package/module.py:first line)" -> "package/module.py:name"
    name, _, where = frame.partition(" (")
    return f"{where.rstrip(')').rsplit(':', 1)[0]}:{name}" if where else name


def summary(path: Path, *, top: int = 20) -> str:
    """Inclusive share of the samples for the product's own functions, most first, and
    the leaf (self) share by library, so a reader sees what asked for the time and where it
    was spent."""
    stacks = read_stacks(path)
    total = sum(stacks.values()) or 1
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, count in stacks.items():
        own = {_function(f) for f in stack if any(part in f for part in OWN_CODE)}
        for function in own:
            inclusive[function] += count
        leaf = _function(stack[-1]).split(":")[0]
        leaves[leaf.split("/")[0]] += count
    lines = [f"{path.name}: {total} samples", "inclusive, product code:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines.append("self, by top-level package or file:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in leaves.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(summary(Path(name)))
