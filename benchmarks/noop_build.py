"""Time no-op builds: `python benchmarks/noop_build.py recipes/tiny.yaml [--runs 10]`.

The recipe must already be built (the first run here builds it if not, untimed). Each timed run is a
fresh `optforge build` process, as a user or CI would run it, so interpreter start-up and imports count.
Prints every run, the median, and whether torch was imported (it must not be on a no-op build).
Target: median <= 1.0 s on a 2-core machine. A measurement, not a test threshold.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def optforge(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "optforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    build = ("build", args.recipe, "--device", args.device)

    warm = optforge(*build)  # builds what is stale, primes the OS file cache
    if warm.returncode != 0:
        print(warm.stdout + warm.stderr, file=sys.stderr)
        return warm.returncode
    times = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        r = optforge(*build)
        times.append(time.perf_counter() - t0)
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr.strip()
        print(f"run {i + 1:>2}: {times[-1]:.3f} s  {last}")
        if not last.startswith("nothing to do"):
            print("not a no-op build: something was stale", file=sys.stderr)
            return 1
    traced = optforge(*build, importtime=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if "|" in line}
    print(f"median {statistics.median(times):.3f} s over {args.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}); torch imported: {'torch' in imported}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
