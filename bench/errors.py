"""Errors the command line turns into one clear line and an exit code instead of a traceback."""


class BenchError(Exception):
    """A user error (bad suite, bad arguments, missing or bad data): exit code 2, one line."""

    exit_code = 2


class SuiteError(BenchError):
    """A suite file that cannot be used; the message names the file, the key path and what was expected."""

    def __init__(self, source: str, path: str, message: str) -> None:
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {message}")
        self.source, self.path, self.detail = source, path, message


class DataError(BenchError):
    """A dataset file that is missing, truncated, unreadable or refused."""


class Interrupted(Exception):
    """The user pressed Ctrl-C; raised between batches so that the current cell is abandoned cleanly."""
