"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class CrucibleError(Exception):
    """Bad input or an unusable run: the message is meant for the user, as is."""


class RecorderError(CrucibleError):
    """The background writer failed; the cause is chained."""


class Interrupted(CrucibleError):
    """Training was stopped by Ctrl-C or SIGTERM after committing what it had."""


def missing_chunk_error(name: str, first: int, last: int, fix: str = "crucible-record verify") -> CrucibleError:
    """The one wording of "a chunk holding committed rows is gone" (readers, resume, dask tasks).

    Used as ``format.blocks.missing_chunk_error``; defined here, below every module, because
    blockread needs it and format.blocks imports blockread."""
    return CrucibleError(f"{name} is damaged: the chunk holding rows {first}-{last} is missing (run `{fix}`)")
