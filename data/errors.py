"""
User errors: a bad setting or a bad or missing file. Every script reports them as one line,

    error: <what is wrong, naming the setting or file>

on stderr and exits with status 1, while a program bug keeps its full traceback. A script
adopts this with one line before it does anything else:

    report_user_errors()

It lives in data/ so that the data modules, which import nothing from the project's root, can
raise these too (ShardError derives from UserError).
"""

import sys


class UserError(ValueError):
    """Something the user can fix: a setting, a file, a command line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named, or a setting points to, does not exist."""


def report_user_errors():
    """Prints a UserError as one `error:` line instead of a traceback; anything else (a bug)
    still gets Python's traceback."""
    previous_hook = sys.excepthook

    def hook(kind, error, traceback):
        if isinstance(error, UserError):
            print(f"error: {error}", file=sys.stderr)
        else:
            previous_hook(kind, error, traceback)

    sys.excepthook = hook
