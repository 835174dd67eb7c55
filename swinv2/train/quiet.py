"""Keep one copy of DeepSpeed's accelerator notice in a run's log instead of one per process.

DeepSpeed logs ``Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.``
as a warning in every process that imports it (deepspeed 0.19, ``accelerator/real_accelerator.py``): the
``deepspeed`` runner, its per-node launcher and every rank. The notice matters (a GPU that torch cannot see
trains on the CPU), so it is kept where it is said first: the runner, or rank 0 of a run started otherwise.
"""

from __future__ import annotations

import logging
import os

from .engine import deepspeed_launcher

NOTICE = "Setting accelerator to CPU"


class _RepeatedNotice(logging.Filter):
    """Drops the accelerator notice in a process where it repeats one already shown; passes everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.repeat = deepspeed_launcher()[0] is not None or os.environ.get("RANK", "0") != "0"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.repeat and record.getMessage().startswith(NOTICE))


def quiet_repeated_deepspeed_notices() -> None:
    """Install the filter on DeepSpeed's logger; call it before the first ``import deepspeed`` (the notice comes at
    import). Only that one notice is affected, and only where it is a repeat."""
    logger = logging.getLogger("DeepSpeed")  # deepspeed.utils.logging creates its logger under this name
    if not any(isinstance(f, _RepeatedNotice) for f in logger.filters):
        logger.addFilter(_RepeatedNotice())
