"""What the entry points share around a run: one log from rank zero, quiet known warnings, closing W&B."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

# Lightning warnings about choices made on purpose
EXPECTED_WARNINGS = (
    # the frozen backbone stays in eval mode (its BatchNorm keeps the running statistics)
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # the module's on_before_batch_transfer (feature cache) is meant to run with the datamodule
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but",
    # without data.val_fraction the validation loader is deliberately empty
    r"Total length of `list` across ranks is zero",
)


class _OtherRanksErrorsOnly(logging.Filter):
    """One console and log file, not one per process: ranks other than zero pass on errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or rank_zero_only.rank == 0


_RANK_FILTER = _OtherRanksErrorsOnly()


def log_from_rank_zero() -> None:
    """Under DDP, let only rank zero write INFO and WARNING lines to the console and the log file."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RANK_FILTER)


@contextmanager
def expected_warnings_silenced() -> Iterator[None]:
    """Hide the Lightning warnings listed in EXPECTED_WARNINGS while a fit or test runs."""
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


@rank_zero_only
def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs (each sweep job is its own run) and say where an offline run lies."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run_dir = Path(logger.experiment.dir).parent
        offline = logger._offline
        logger.experiment.finish()
        if offline:
            log.info("W&B offline run saved in %s; upload it with `wandb sync %s`", run_dir, run_dir)
