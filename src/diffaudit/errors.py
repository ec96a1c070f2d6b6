"""User-facing errors and the one place that turns them into a one-line message.

Every error caused by the user's input (config, images, model, layers, stores, downloads) derives from
:class:`DiffauditError`; workflow scripts and the command line run their task through :func:`run_task`, which
reports such an error as one line that says what to do, without a traceback. Anything else is a bug (in numpy,
pandas, torch or this package) and keeps its full traceback.
This module imports nothing from the package, so a rule's code dependencies stay its own.
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path


class DiffauditError(Exception):
    """Base of all errors that are the user's to fix; the message says how."""


class UserError(DiffauditError, ValueError):
    """A bad value in the configuration or the arguments (also a ValueError, for callers that catch those)."""


class MissingInputError(DiffauditError, FileNotFoundError):
    """An input the user must produce first (a store, a variant) is not there; the message says how."""


class ModelLoadError(DiffauditError, RuntimeError):
    """A model could not be resolved or loaded; the message says what to do."""


def run_task(fn, *args, log: str | Path | None = None, **kwargs):
    """Run a workflow task or command; a user error exits with status 1 and one line naming the file or key.

    With ``log`` (the rule's ``log:`` file) the task's log messages, and the error line or traceback of a
    failure, are written there as well as to standard error.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", handlers=handlers,
                        force=True)
    try:
        return fn(*args, **kwargs)
    except DiffauditError as exc:
        msg = "diffaudit error: " + " ".join(str(exc).split())
        print(msg, file=sys.stderr)
        if log is not None:
            with open(log, "a") as f:
                print(msg, file=f)
        sys.exit(1)
    except Exception:
        if log is not None:
            with open(log, "a") as f:
                traceback.print_exc(file=f)
        raise
