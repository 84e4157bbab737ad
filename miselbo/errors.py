"""Exception classes that cross layers, and the exit statuses a command line gives them.

A user mistake raises one of USER_ERRORS with a one-paragraph message saying what, where and how
to fix it; `miselbo.runtime.cli.run_cli` prints it without a traceback and exits with
EXIT_USER_ERROR. The classes live here, below every layer that raises or catches them, so that
no layer imports another only to name its exception.
"""

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake in the command line or the inputs; the message says what, where and how to fix it."""


class DataError(ValueError):
    """A data set cannot be used or a batch is malformed; the message says what and how to fix."""


class CheckpointError(Exception):
    """A checkpoint cannot be used; the one-paragraph message says which file and why."""


class SafeIOError(Exception):
    """A file could not be written or verified; the message says which file and why."""


USER_ERRORS = (UserError, CheckpointError, DataError, SafeIOError)
