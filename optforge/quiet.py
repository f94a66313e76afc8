"""Third-party import noise, kept out of the CLI's output unless `optforge --verbose`.

Importing torchao (which transformers and the quantize/serve paths do) writes, on a machine whose
CUDA does not match torchao's prebuilt kernels (every CPU-only one):
  Failed to load .../torchao/_C_mxfp8...so: Could not load this library: ...
  Failed to load .../torchao/_C_cutlass_90a.abi3.so: ...
  W... torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass and is now natively
  supported by torch.compile as an opaque value type. Calling register_constant() on Enum subclasses
  is deprecated ...
None is an error: torchao works without those optional kernels, and the deprecation is torchao's to
fix. Both are WARNING records of the `logging` module (not `warnings.warn`, not prints): the first on
the "torchao" logger (torchao/__init__.py; no handler, so logging's last-resort handler prints it),
the second on "torch.utils._pytree" (torch's own handler prints it). A filter on each of those two
loggers drops exactly those messages; every other record of theirs, and every other logger, is
untouched. The CLI's group calls `quiet_imports` once, before any command imports torch.
"""

from __future__ import annotations

import contextlib
import logging

# logger name -> a piece of the one message of it that is noise
NOISE = {
    "torchao": "Failed to load ",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
}


class _DropMessage(logging.Filter):
    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


_FILTERS = {name: _DropMessage(marker) for name, marker in NOISE.items()}


def quiet_imports(verbose: bool = False) -> None:
    """Drop the known import noise (`NOISE`) from now on; with `verbose`, let it through again."""
    for name, noise_filter in _FILTERS.items():
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(noise_filter)
        else:
            logger.addFilter(noise_filter)  # adding it twice keeps one


def quieted() -> bool:
    """Whether this process drops the import noise (what a Dask worker running its stages should do too)."""
    return all(f in logging.getLogger(name).filters for name, f in _FILTERS.items())


@contextlib.contextmanager
def dropped(marker: str, logger: str = ""):
    """For the duration, records of `logger` (default: the root logger) whose message holds `marker` are
    dropped. The root logger also gets a NullHandler meanwhile: `logging.warning(...)` on a root logger
    without handlers would otherwise install a stderr handler for good (logging.basicConfig)."""
    log = logging.getLogger(logger)
    drop, null = _DropMessage(marker), logging.NullHandler()
    log.addFilter(drop)
    log.addHandler(null)
    try:
        yield
    finally:
        log.removeFilter(drop)
        log.removeHandler(null)
