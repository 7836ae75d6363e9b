"""`make bench`: every benchmark in turn, each printing one JSON line and a markdown row."""

from __future__ import annotations

import sys

from bench import simulator_rps

BENCHMARKS = [simulator_rps.main]


def main() -> int:
    return max(benchmark([]) for benchmark in BENCHMARKS)


if __name__ == "__main__":
    sys.exit(main())
