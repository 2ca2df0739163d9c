"""Expected failures: bad input, missing files, no network.

Library code raises `NucleisegError` with a message that names the file and the
fix; entry points turn it into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import signal
import sys
import traceback


class NucleisegError(Exception):
    """A failure the user can fix; its message is shown as is, without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, carrying what running the stage again will do (e.g. whether there is anything to resume):
    main_guard prints it instead of its `interrupted` line."""


# `scheme://user:password@host`: the user-info part of a URI. MLflow and urllib3 put the
# tracking URI into their exception texts, which would print a server password.
_USER_INFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by `***`."""
    return _USER_INFO.sub(r"\1***@", str(text))


# What the user can do about an OS error, by errno (strerror says what happened).
_OS_FIXES = {
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "free some space and run again",
    errno.EACCES: "fix its permissions, or use a location you can write to",
    errno.EPERM: "fix its permissions, or use a location you can write to",
    errno.EROFS: "use a location on a writable file system",
    errno.ENOENT: "it is gone (removed while running?); restore it and run again",
    errno.EISDIR: "a folder is where a file was expected",
    errno.ENOTDIR: "a file is where a folder was expected",
    errno.EEXIST: "it is in the way (a file where a folder goes?)",
}


def os_error_text(exc: OSError) -> str:
    """One line for an OS error: the file, what happened and what to do."""
    what = exc.strerror or type(exc).__name__
    fix = _OS_FIXES.get(exc.errno)
    names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    where = f"{' -> '.join(names)}: " if names else ""
    return " ".join(f"{where}{what}{'; ' + fix if fix else ''}".split())


def _redact_log_records() -> None:
    """Every log record, of any logger and handler (MLflow and urllib3 log the tracking URI), is
    redacted when it is made; only records at an enabled level are made, so this costs nothing else."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when it emits the record
            return record
        if "@" in message:
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return record

    factory.redacts = True
    logging.setLogRecordFactory(factory)


# Every stage writes its outputs atomically and only train keeps a resume checkpoint (its Interrupted says).
RUN_AGAIN = "nothing half-written was kept; running it again starts over"


def main_guard(func=None, *, interrupted: str = f"interrupted; {RUN_AGAIN}"):
    """Decorate a `main()`: NucleisegError and OSError -> one 'error: ...' line and exit 2.

    `interrupted` is the line for Ctrl-C / SIGTERM (exit 130), unless the code raised an
    `Interrupted` that says what running again will do. No output names a URI's
    credentials: error lines, log records and the traceback of an unexpected error are redacted.
    """
    if func is None:
        return functools.partial(main_guard, interrupted=interrupted)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.captureWarnings(True)  # warnings pass through the redacting log records too
        _redact_log_records()
        # `dvc exp remove`/`kill` and job schedulers send SIGTERM: unwind like Ctrl-C so that
        # context managers run (the MLflow run is marked FAILED, temp outputs are removed).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return func(*args, **kwargs)
        except NucleisegError as exc:
            print(f"error: {redact(exc)}", file=sys.stderr)
            sys.exit(2)
        except OSError as exc:  # permission, disk full, a file removed mid-run: what the user can fix
            logging.getLogger(__name__).debug("traceback", exc_info=True)
            print(f"error: {redact(os_error_text(exc))}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            said = f"interrupted; {exc}" if isinstance(exc, Interrupted) and str(exc) else interrupted
            print(f"error: {redact(said)}", file=sys.stderr)
            sys.exit(130)
        except Exception:  # a bug: keep its traceback, without secrets
            print(redact(traceback.format_exc()), file=sys.stderr, end="")
            sys.exit(1)

    return wrapper
