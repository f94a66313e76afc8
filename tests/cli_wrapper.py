"""`optforge` as the console script runs it, for subprocess tests. Optionally with the fake stages
(OPTFORGE_TEST_FAKE_STAGES=1) and recording every imported module at exit
(OPTFORGE_TEST_MODULES_OUT=<file>), which is how tests prove a no-op build never imports torch.
Guarded by __main__ like a console script: a process that multiprocessing spawns (a local Dask cluster's
workers) imports this file again, and must not run a second build."""

import atexit
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    if os.environ.get("OPTFORGE_TEST_FAKE_STAGES") == "1":
        import fake_stages

        fake_stages.install()

    _out = os.environ.get("OPTFORGE_TEST_MODULES_OUT")
    if _out:
        atexit.register(lambda: Path(_out).write_text("\n".join(sorted(sys.modules)) + "\n"))

    from optforge.cli import main

    main(prog_name="optforge")
