"""Errors caused by the user's config, input data, models or environment, each with its own exit code.

`dpo-ray` prints any of them as one line, `dpo-ray: <kind> error: <what, where, what to do>`, and exits with
its code; a traceback only with `--debug` or `DPO_RAY_DEBUG=1`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    kind = "input"
    exit_code = 3


class ConfigError(UserError, ValueError):
    """A configuration problem, naming the key."""

    kind, exit_code = "config", 2


class InputError(UserError, ValueError):
    """A problem with input data, naming the file, row and field."""

    kind, exit_code = "input", 3


class ModelError(UserError, RuntimeError):
    """A model that cannot be loaded or does not fit its role."""

    kind, exit_code = "model", 4


class StorageError(UserError, OSError):
    """run.root cannot be written, or its disk is (nearly) full."""

    kind, exit_code = "storage", 5


class TrainingError(UserError, RuntimeError):
    """Training cannot go on with these settings (e.g. a loss that stays non-finite)."""

    kind, exit_code = "training", 6


# What SQLite, MLflow's default store, answers when a write cannot land: a full disk (SQLITE_FULL), or a write
# refused by the kernel, as past a file size limit (SQLITE_IOERR).
_SQLITE_WRITE_FAILURES = ("database or disk is full", "disk I/O error")


def tracking_store_failure(err: BaseException) -> str | None:
    """SQLite's message when `err`, or an exception behind it, is the MLflow sqlite store failing to write."""
    for current in _exceptions_behind(err):
        text = str(current)
        if "sqlite3.OperationalError" in text or type(current).__module__ == "sqlite3":
            found = next((m for m in _SQLITE_WRITE_FAILURES if m in text), None)
            if found:
                return found
    return None


def tracking_store_error(err: BaseException, doing: str) -> "StorageError | None":
    """A one-line StorageError for a failed write to MLflow's sqlite store while `doing`, else None."""
    import errno

    failure = tracking_store_failure(err)
    if failure is None:
        return None
    import mlflow

    return StorageError(errno.ENOSPC, f"{doing}: the MLflow store {mlflow.get_tracking_uri()} could not be written "
                        f"(SQLite: {failure}; the disk holding it is full or a file size limit was reached)")


def _exceptions_behind(err: BaseException):
    """`err` and the exceptions behind it, nearest first: Ray's wrappers (RayTaskError.cause) are looked through,
    then each exception's __cause__ and __context__."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # Ray's RayTaskError: the exception the task raised
        if isinstance(cause, BaseException):
            pending.insert(0, cause)
            continue
        yield current
        pending += [current.__cause__, current.__context__]


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, looking through Ray's wrappers (RayTaskError.cause) and exception chains."""
    return next((e for e in _exceptions_behind(err) if isinstance(e, UserError)), None)


def one_line(err: UserError) -> str:
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return f"dpo-ray: {err.kind} error: {' '.join(text.split())}"
