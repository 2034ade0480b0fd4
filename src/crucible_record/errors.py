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
