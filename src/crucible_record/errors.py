"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class CrucibleError(Exception):
    """Bad input or an unusable run: the message is meant for the user, as is."""


class RecorderError(CrucibleError):
    """The background writer failed; the cause is chained."""


class Interrupted(CrucibleError):
    """Training was stopped by Ctrl-C or SIGTERM after committing what it had."""


def describe(error: BaseException) -> str:
    """One line for an error: a CrucibleError's own message, else its type and first line."""
    if isinstance(error, CrucibleError):
        return str(error)
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def missing_chunk_error(name: str, first: int, last: int, fix: str = "crucible-record verify") -> CrucibleError:
    """The one wording of "a chunk holding committed rows is gone" (readers, resume, dask tasks).

    Defined here, below every module, since the writer, the readers and blockread all raise it."""
    return CrucibleError(f"{name} is damaged: the chunk holding rows {first}-{last} is missing (run `{fix}`)")
