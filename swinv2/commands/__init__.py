"""The console commands (``swinv2-finetune``, ``swinv2-evaluate``, ``swinv2-convert``, ``swinv2-make-shards``; the
SimMIM ones are in ``simmim.commands``) and the one error guard they all run under.

Each command is a module with ``main(argv=None) -> int``, the function behind both its console script
(``[project.scripts]`` in pyproject.toml) and its ``launch/*.py`` file. A mistake the user can fix (a bad config
key, a missing shard, a wrong checkpoint) ends in one sentence on stderr and exit status 2, like argparse's own
usage errors; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

Errors = tuple[type[Exception], ...]
Command = Callable[[list[str] | None], int]

# Commands whose input is a file or path the user names (convert, evaluate, make_shards) also count the plain
# errors the readers they call raise for a bad file: a ValueError (every typed user error is one) or a missing path.
FILE_ERRORS: Errors = (ValueError, FileNotFoundError)
# The configs folder of the checkout the package is installed from (editable), for the demo defaults.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def typed_user_errors() -> Errors:
    """The typed errors a user causes (all ValueErrors, so a plain ValueError, a bug, is not among them).
    Imported when asked: their modules load DeepSpeed, which make_shards does without."""
    from ..data import DataError
    from ..finetune.weights import WeightsError
    from ..train.config import ConfigError
    from ..train.safe_load import UnsafeCheckpointError

    return ConfigError, DataError, WeightsError, UnsafeCheckpointError


def checkpoint_write_errors() -> Errors:
    """A checkpoint write that failed, e.g. on a full disk (imported when asked, as above)."""
    from ..train.checkpoint_manager import CheckpointWriteError

    return (CheckpointWriteError,)


def say_error(error: BaseException | str, prog: str | None = None) -> None:
    """``error: <sentence>`` (``prog: error: ...`` with a ``prog``) on stderr in one write, so that the lines of
    several ranks stay whole."""
    print(f"{prog + ': ' if prog else ''}error: {error}\n", end="", file=sys.stderr, flush=True)


def run_command(command: Command, argv: list[str] | None = None, *, user_errors: Errors | None = None,
                write_errors: Errors | None = None, prog: str | None = None) -> int:
    """``command(argv)``'s exit status, with its errors sorted: one of ``user_errors`` (default: the typed ones)
    -> one sentence and 2; one of ``write_errors`` (default: a failed checkpoint write; every rank says so and
    exits, none waits) -> one sentence and 1; Ctrl-C -> one line and 130; anything else propagates with its
    traceback (a bug; Python exits with 1). argparse's usage errors are ``SystemExit(2)`` and pass through untouched."""
    user_errors = typed_user_errors() if user_errors is None else user_errors
    write_errors = checkpoint_write_errors() if write_errors is None else write_errors
    try:
        return command(argv)
    except user_errors as error:
        say_error(error, prog)
        return 2
    except write_errors as error:
        say_error(error, prog)
        return 1
    except KeyboardInterrupt:  # Ctrl-C (twice in a training run: the first one checkpoints): no traceback
        print(f"{prog + ': ' if prog else ''}stopped by Ctrl-C\n", end="", file=sys.stderr, flush=True)
        return 130
