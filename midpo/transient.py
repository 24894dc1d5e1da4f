"""Which failures are worth retrying: those a second attempt can get past.

A killed or crashed training process (or launched rank), a dropped connection, an S3 5xx or throttle, a locked SQLite store
and a CUDA out-of-memory (the trainer already retries with a smaller micro-batch; another attempt may land
on a freer device) are transient. A bad config, bad data or a bug fails the same way every time: retrying
it only delays the error, so it is not.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

from midpo.launch import LaunchFailed

# S3 error codes that mean "try again" (botocore's own retry list for throttling and transient errors)
S3_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it (an MLflow or Prefect error wrapping a connection error)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _one(exc: BaseException) -> bool:
    if isinstance(exc, (BrokenProcessPool, LaunchFailed, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return True
    name = type(exc).__name__
    module = type(exc).__module__
    if module.startswith("botocore"):
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(exc, (HTTPClientError, BotoConnectionError)):  # refused/closed/reset, read and connect timeouts
            return True
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or error.get("Code") in S3_TRANSIENT_CODES
    if module.startswith(("requests", "urllib3", "httpx", "httpcore")):
        return any(word in name for word in ("Connection", "Timeout", "Protocol", "RemoteDisconnected"))
    return name == "OutOfMemoryError" and module.startswith("torch")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failure that another attempt may not meet."""
    return any(_one(e) for e in _chain(exc))
