"""Client-caused protocol faults: a malformed request is the client's error, never the server's.

gunicorn logs some of them as server errors: a malformed chunk it meets while discarding a body the app
did not read (after a 413, say) is an OSError, and gunicorn logs every OSError but a reset or broken pipe
with ``log.exception``, a traceback at ERROR that Sentry's logging integration turns into an error event.
Anyone could send those, as many as they like. ``ClientFaultFilter`` (on gunicorn's error logger, from
gunicorn.conf.py's logconfig_dict) makes each such record one WARNING line without a traceback, and
monitoring/sentry.py drops any event that still carries one of these exceptions.
"""

from __future__ import annotations

import logging


def client_fault_types() -> tuple[type[BaseException], ...]:
    """The exception classes that mean a client sent a malformed request; empty without gunicorn."""
    try:
        from gunicorn.http import errors
    except ImportError:
        return ()
    # ParseException covers the request line and headers; ConfigurationProblem among them is the server's
    # own (is_client_fault leaves it out). The others are raised while a body is read.
    return (errors.ParseException, errors.NoMoreData, errors.InvalidChunkSize, errors.ChunkMissingTerminator,
            errors.InvalidChunkExtension)


def is_client_fault(exc: BaseException | None) -> bool:
    """Whether exc is a malformed request from a client rather than a fault of memfit or its server."""
    if exc is None or type(exc).__name__ == "ConfigurationProblem":
        return False
    return isinstance(exc, client_fault_types())


class ClientFaultFilter(logging.Filter):
    """Turn a record that carries a client fault into one WARNING line naming it, without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno > logging.WARNING and is_client_fault(exc):
            record.msg = f"{record.getMessage()} (client fault, {type(exc).__name__}: {exc})"
            record.args = ()
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.exc_info, record.exc_text = None, None
        return True
