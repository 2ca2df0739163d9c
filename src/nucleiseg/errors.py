"""Expected failures: bad input, missing files, no network.

Library code raises `NucleisegError` with a message that names the file and the
fix; entry points turn it into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys


class NucleisegError(Exception):
    """A failure the user can fix; its message is shown as is, without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what running again will do (the train stage: resume, or start over)."""


# Every stage writes its outputs atomically and only train keeps a resume checkpoint (its Interrupted says).
RUN_AGAIN = "nothing half-written was kept; running it again starts over"


def main_guard(func):
    """Decorate a `main()`: NucleisegError -> one 'error: ...' line and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # `dvc exp remove`/`kill` and job schedulers send SIGTERM: unwind like Ctrl-C so that
        # context managers run (the MLflow run is marked FAILED, temp outputs are removed).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return func(*args, **kwargs)
        except NucleisegError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            print(f"error: interrupted; {exc if isinstance(exc, Interrupted) and str(exc) else RUN_AGAIN}", file=sys.stderr)
            sys.exit(130)

    return wrapper
