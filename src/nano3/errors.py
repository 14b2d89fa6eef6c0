"""One exception type for mistakes a user can fix (bad params, missing files, corrupt shards).

Stage entry points print it as a single `error: ...` line and exit non-zero, instead of a traceback:
the message must name the file or key at fault and say what to do.
"""


class UserError(Exception):
    """A problem with the user's input or configuration, reported as one line."""


def brief(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for embedding in a UserError message."""
    lines = str(exc).strip().splitlines()
    return (lines[0][:limit] if lines else "") or type(exc).__name__
