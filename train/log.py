"""kiln's log: the one place that decides how the loop, the tasks and the training launchers
report (``logging``, logger ``kiln``), so every line has one format and ranks do not repeat
each other.

- Format: ``[kiln] message`` on rank 0; ``[kiln rank N] message`` elsewhere; a warning or
  error reads ``[kiln] warning: message``. Lines go to standard output, which scripts and
  tests read (``[kiln] sample: ...``, ``[kiln] document mask: ...``), and to the
  ``sys.stdout`` of the moment, so a redirected or captured stream receives them.
- Rank-aware: rank 0 reports from INFO up; the other ranks only warnings and errors (each
  rank's own trouble is still heard, named by rank).
- ``logger()`` sets itself up from ``$RANK`` on first use (a launcher before its backend
  exists); ``setup(rank)`` re-sets it with the rank the backend reports. The logger does not
  propagate to the root logger that Hydra configures, so no line appears twice.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

NAME = "kiln"


class _CurrentStdout(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` is when a record is emitted."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler assigns it; the current sys.stdout is always used
        pass


class _Format(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = "[kiln]" if rank == 0 else f"[kiln rank {rank}]"

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        return f"{self.prefix} {msg}"


_rank: Optional[int] = None


def setup(rank: Optional[int] = None) -> logging.Logger:
    """(Re)configure the ``kiln`` logger for this process's rank (default: ``$RANK``, else 0)."""
    global _rank
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    log = logging.getLogger(NAME)
    for h in [h for h in log.handlers if isinstance(h, _CurrentStdout)]:
        log.removeHandler(h)
    handler = _CurrentStdout()
    handler.setFormatter(_Format(rank))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    _rank = rank
    return log


def logger() -> logging.Logger:
    """The ``kiln`` logger, set up on first use."""
    if _rank is None:
        return setup()
    return logging.getLogger(NAME)


def report_validation(result: dict) -> None:
    """The run's validation loss, first evaluation to last, as every training launcher reports it."""
    vals = result["val_losses"]
    if vals:
        first, last = min(vals), max(vals)
        logger().info(f"validation loss {vals[first]:.3f} (step {first}) -> {vals[last]:.3f} (step {last})")
