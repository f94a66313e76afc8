"""Child processes that die with the build that started them.

A build runs some work in child processes (the AOTInductor compile, the serving benchmark's server).
Killed with SIGKILL, the build gets no chance to clean up, and such a child would live on under PID 1,
still compiling or still listening. So a child is started with `child_env()` (its parent's pid in
OPTFORGE_PARENT_PID), and the child's entry point calls `die_with_parent()` first thing: it asks the
kernel (Linux prctl PR_SET_PDEATHSIG) for SIGKILL when the parent goes, whatever way it goes, then
checks the parent has not gone already. Done in the child rather than in a `preexec_fn`, which is not
safe in a parent that runs threads (torch does). Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys

PARENT_ENV = "OPTFORGE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: "dict | None" = None) -> dict:
    """The environment for a child that must die with this process."""
    return dict(os.environ if env is None else env, **{PARENT_ENV: str(os.getpid())})


def die_with_parent() -> None:
    """In a child started with `child_env`: SIGKILL this process when its parent exits."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if str(os.getppid()) != parent:  # the parent died before the request was in place
        os._exit(1)
