"""Third-party import noise stays out of the CLI's output unless `optforge --verbose` (optforge/quiet.py)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from optforge.quiet import NOISE, quiet_imports
from optforge_testing import REPO

TORCH_LOG_PREFIX = re.compile(r"^[DIWEC]\d{4} [\d:.]+ \d+ ")  # torch's handler: level, date, time, pid


@pytest.fixture
def noise_filtered():
    quiet_imports(verbose=False)
    yield
    quiet_imports(verbose=True)


class Collect(logging.Handler):
    """The records that reach a logger's own handlers (torch's loggers do not propagate to the root,
    where caplog listens, once torch is imported)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.name, record.getMessage()))


@pytest.mark.parametrize("logger", sorted(NOISE))
def test_only_the_known_message_of_each_noisy_logger_is_dropped(logger, noise_filtered):
    log, collect = logging.getLogger(logger), Collect()
    level = log.level
    log.setLevel(logging.WARNING)  # whatever level earlier code left: the filter alone is under test
    log.addHandler(collect)
    try:
        log.warning("%s -- %s", NOISE[logger], "the noise")
        log.warning("a warning that matters")
        logging.getLogger(f"{logger}.child").warning(NOISE[logger])  # other loggers are untouched
        assert collect.seen == [(logger, "a warning that matters"), (f"{logger}.child", NOISE[logger])]
        quiet_imports(verbose=True)
        log.warning(NOISE[logger])
        assert collect.seen[-1] == (logger, NOISE[logger])
    finally:
        log.removeHandler(collect)
        log.setLevel(level)


def _stderr_after_cli(cli_args: list[str] | None) -> list[str]:
    """stderr of a fresh interpreter that runs `optforge CLI_ARGS` (None: no CLI) and then imports
    torchao, as `serve` and the quantize stage do; torch's log prefix (time, pid) removed."""
    cli = "" if cli_args is None else (
        f"from optforge.cli import main; main({cli_args!r}, standalone_mode=False, prog_name='optforge'); ")
    proc = subprocess.run([sys.executable, "-c", cli + "import torchao"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [TORCH_LOG_PREFIX.sub("", line) for line in proc.stderr.splitlines()]


def test_the_cli_hides_torchaos_import_noise_and_verbose_shows_all_of_it():
    recipe = str(REPO / "recipes" / "tiny.yaml")
    raw = _stderr_after_cli(None)
    quiet = _stderr_after_cli(["validate", recipe])
    verbose = _stderr_after_cli(["--verbose", "validate", recipe])
    assert verbose == raw  # --verbose hides nothing (on a machine where torchao loads cleanly: both empty)
    assert quiet == [line for line in raw if not any(marker in line for marker in NOISE.values())]
    assert not any("Failed to load" in line or "is an Enum subclass" in line for line in quiet)
