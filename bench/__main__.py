"""`make bench`: every benchmark in turn, each printing one JSON line and a markdown row."""

from __future__ import annotations

import sys

from bench import (
    api,
    broker,
    copy,
    inflight,
    simulator_rps,
    steps,
    throughput,
    upstream_calls,
)

# Quickest first; `inflight` (10,000 jobs) takes longest by far (docs/benchmarks.md).
BENCHMARKS = [
    simulator_rps.main,
    broker.main,
    steps.main,
    api.main,
    copy.main,
    throughput.main,
    upstream_calls.main,
    inflight.main,
]


def main() -> int:
    return max(benchmark([]) for benchmark in BENCHMARKS)


if __name__ == "__main__":
    sys.exit(main())
