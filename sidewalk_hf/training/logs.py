"""Logging for the entry points: time, level and process index on every line, a ``log.txt`` in the run
folder so that what was printed survives the terminal, and training progress as a bar on a terminal or as
one plain line per log period in a job's output file.

INFO is shown on each node's main process, WARNING and above elsewhere. Module loggers (``sidewalk_hf.*``)
propagate to the handlers configured here.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s [process %(process_index)s] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
MAIN_LOG_FILE = "log.txt"
# Set on a record that a progress bar already shows, so it goes to the log file but not to the console.
FILE_ONLY = "file_only"


class _ProcessIndexFilter(logging.Filter):
    def __init__(self, process_index: int):
        super().__init__()
        self.process_index = process_index

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_index = self.process_index
        return True


class _ConsoleFilter(logging.Filter):
    def __init__(self, below: int | None = None):
        super().__init__()
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        return self.below is None or record.levelno < self.below


def _handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_sidewalk_hf", False)]


def configure_logging(process_index: int, local_main_process: bool) -> None:
    """Console logging for this process: INFO and below to stdout, WARNING and above to stderr.

    Called again (a second run in the same interpreter), it replaces the handlers it added before.
    """
    root = logging.getLogger()
    for handler in _handlers():
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    process_filter = _ProcessIndexFilter(process_index)
    for stream, console_filter in (
        (sys.stdout, _ConsoleFilter(below=logging.WARNING)),
        (sys.stderr, _ConsoleFilter()),
    ):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(process_filter)
        handler.addFilter(console_filter)
        if stream is sys.stderr:
            handler.setLevel(logging.WARNING)
        handler._sidewalk_hf = True
        root.addHandler(handler)
    level = logging.INFO if local_main_process else logging.WARNING
    root.setLevel(logging.WARNING)
    logging.getLogger("sidewalk_hf").setLevel(level)
    logging.getLogger("__main__").setLevel(level)


def log_file_name(process_index: int) -> str:
    return MAIN_LOG_FILE if process_index == 0 else f"log_process{process_index}.txt"


def add_run_log_file(run_dir: Path, process_index: int) -> Path:
    """Also write this process's log to the run folder (appending: a resumed run continues the file)."""
    path = Path(run_dir) / log_file_name(process_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.addFilter(_ProcessIndexFilter(process_index))
    handler._sidewalk_hf = True
    handler._sidewalk_hf_file = True
    logging.getLogger().addHandler(handler)
    return path


def log_exception_to_files(logger: logging.Logger, message: str) -> None:
    """Write the exception being handled, with its traceback, to the run log files only (Python prints it
    on the console when it ends the program)."""
    record = logger.makeRecord(logger.name, logging.ERROR, "", 0, message, None, sys.exc_info())
    record.process_index = "?"
    for handler in _handlers():
        if getattr(handler, "_sidewalk_hf_file", False):
            handler.handle(record)


def progress_bar_wanted() -> bool:
    """A redrawn bar only on a terminal; ``TQDM_DISABLE=1`` or output to a file (a cluster job) gives plain
    lines."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stdout.isatty() and sys.stderr.isatty()


class TrainingProgress:
    """Progress of the optimizer steps: a tqdm bar on a terminal, and one log line per log period (to the
    log file always, to the console when there is no bar)."""

    def __init__(self, logger: logging.Logger, total: int, initial: int, show: bool):
        self.logger, self.total = logger, total
        self.bar = None
        if show and progress_bar_wanted():
            self.bar = tqdm(total=total, initial=initial, desc="training", unit="it", dynamic_ncols=True)
        self.started, self.start_iteration = time.perf_counter(), initial

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, iteration: int, loss: float, lr: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        done = iteration - self.start_iteration
        seconds_left = (time.perf_counter() - self.started) / max(done, 1) * (self.total - iteration)
        self.logger.info(
            "iteration %d/%d  loss %.4f  lr %.3e  %.1f images/s  eta %s",
            iteration,
            self.total,
            loss,
            lr,
            images_per_s,
            time.strftime("%H:%M:%S", time.gmtime(seconds_left)) if seconds_left < 86400 else "> 1 day",
            extra={FILE_ONLY: self.bar is not None},
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
