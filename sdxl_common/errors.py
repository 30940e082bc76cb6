"""The error classes the command lines sort by: whose problem is it?

- `UserError`: the input is wrong and the user can fix it (a config key or value, a missing or
  malformed file or folder, an unusable output path, a command-line argument). The CLIs print
  one line, ``<prog> <command>: error: <message>``, and exit 2.
- `RunFailure`: the input and the code are fine but the run cannot go on (disk full, storage
  unreachable, a checkpoint that cannot be written). One line, exit 1.
- Anything else is a bug: the CLIs print the traceback and ask for a report, exit 1.

Imports only the standard library, so that xla_infer can use it without pulling in JAX.
"""

from __future__ import annotations

import logging
import sys
import traceback

EXIT_FAILURE = 1  # a RunFailure or a bug
EXIT_USER_ERROR = 2  # as argparse exits for a bad flag


class UserError(Exception):
    """Input the user can fix; the message names the file, folder, key or argument."""


# The subclasses below keep `except FileNotFoundError` / `except ValueError` clauses written
# before UserError existed catching what they caught.


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named (or that a folder the user named must hold) is not there."""


class BadInput(UserError, ValueError):
    """A value, file content or folder layout the user gave that cannot be used."""


class RunFailure(RuntimeError):
    """The run cannot go on for a reason outside its input and its code (disk, network, storage)."""


# The line after a traceback, so that a bug is not mistaken for bad input.
BUG_HINT = "this is a bug in sdxl-tpu; please report it to the sdxl-tpu project with the traceback above"


def report(prefix: str, error: Exception) -> int:
    """What a command line prints on stderr for `error` that ended it; returns the exit status.

    `prefix` names the program (and command), e.g. "flax-train sample".
    """
    if isinstance(error, UserError):
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(error, RunFailure):
        # One write, on a line of its own: library threads may still be printing their part.
        sys.stderr.write(f"\n{prefix}: error: {error}\n")
        sys.stderr.flush()
        return EXIT_FAILURE
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"{prefix}: {BUG_HINT}", file=sys.stderr)
    return EXIT_FAILURE


def quiet_library_noise(own: tuple[str, ...]) -> None:
    """Keeps other libraries' reports of a failure we report ourselves to one line each.

    A checkpoint write that fails (a full disk) makes orbax and tensorstore log the same error
    from several threads with tracebacks through their internals, asyncio log one "Task exception
    was never retrieved" per array, and tensorstore's late callbacks print "Event loop is closed"
    tracebacks: well over a thousand lines around the one line of ours (a RunFailure) that says
    what happened. So: log records of loggers not in ``own`` lose their tracebacks and lines after
    the first, those asyncio records are dropped, and so are uncaught "Event loop is closed"
    errors that reach ``sys.excepthook``. (Some of tensorstore's are printed by its own threads
    without it, and still show.) An unexpected error in our own code still shows its traceback
    (through `report`).
    """
    for handler in logging.getLogger().handlers:
        handler.addFilter(_LibraryTracebacks(own))
    previous = sys.excepthook

    def hook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        previous(kind, value, tb)

    sys.excepthook = hook


class _LibraryTracebacks(logging.Filter):
    def __init__(self, own: tuple[str, ...]):
        super().__init__()
        self.own = own

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self.own):
            return True
        message = record.getMessage()
        if record.name == "asyncio" and "exception was never retrieved" in message:
            return False
        if record.exc_info or "\n" in message:
            record.msg, record.args = (message.splitlines() or [""])[0], None
            record.exc_info = record.exc_text = None
        return True
