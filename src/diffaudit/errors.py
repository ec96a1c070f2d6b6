"""User-facing errors and the one place that turns them into a one-line message.

Every error caused by the user's input (config, images, model, layers, stores, downloads) derives from
:class:`DiffauditError`; workflow scripts run their task through :func:`run_task`, which reports such an error
(and the ValueError/FileNotFoundError of bad arguments) as one line naming the file or key, without a traceback.
This module imports nothing from the package, so a rule's code dependencies stay its own.
"""
from __future__ import annotations

import logging
import sys


class DiffauditError(Exception):
    """Base of all errors that are the user's to fix; the message says how."""


def run_task(fn, *args, **kwargs):
    """Run a workflow task; a user error exits with status 1 and one line naming the file or key."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn(*args, **kwargs)
    except (DiffauditError, ValueError, FileNotFoundError) as exc:
        msg = " ".join(str(exc).split())
        print(f"diffaudit error: {msg}", file=sys.stderr)
        sys.exit(1)
