"""Start-up of the command line: `mupad --help` against `python -c "import torch"`.

Both run as fresh processes, alternately, `--runs` times each; prints the median and the
fastest wall time of each, their ratio, and the peak memory (max RSS) of one run of each.

    python benchmarks/cli_startup.py              # 5 runs each
    taskset -c 1 python benchmarks/cli_startup.py --runs 9
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "mupad --help": [sys.executable, "-m", "mupad.cli", "--help"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_rss_mb(command: list[str]) -> float:
    """Max RSS of one run (the children's maximum grows monotonically: run it in a fresh
    interpreter so earlier runs do not count)."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for name, command in COMMANDS.items():
        wall_time(command)  # warm the file cache once
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
    for name, command in COMMANDS.items():
        print(
            f"{name:28s} median {statistics.median(times[name]):.3f} s, "
            f"fastest {min(times[name]):.3f} s, peak RSS {peak_rss_mb(command):.0f} MB "
            f"({args.runs} runs)"
        )
    help_s, torch_s = (statistics.median(t) for t in times.values())
    print(f"mupad --help takes {help_s / torch_s:.2f}x the time of importing torch")


if __name__ == "__main__":
    main()
