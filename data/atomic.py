"""
Every file the project writes is written through atomic_write: into a temporary file beside
it, flushed to disk, then renamed over the target. A reader (or a resumed run) therefore sees
the old file or the whole new one, never half of one, even after a crash, a kill or a full
disk. It lives in data/ so that the data modules, which import nothing from the project's
root, use it too.
"""

import contextlib
import os

from data.errors import UserError


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """`with atomic_write(path, "wb") as f:` writes f to `path` all at once when the block ends
    without an exception. With mode=None it yields the temporary path instead of a file, for
    writers that want a name (numpy's open_memmap). A failed write removes the temporary file
    (it would otherwise keep a full disk full) and a file system error (full disk, quota,
    permissions) becomes a UserError naming `path`."""
    tmp = f"{path}.tmp{os.getpid()}"  # per process: two writers of one path never share it
    try:
        if mode is None:
            yield tmp
        else:
            with open(tmp, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e
        while cause is not None and not isinstance(cause, (OSError, KeyboardInterrupt)):  # torch.save wraps it
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, KeyboardInterrupt) and cause is not e:
            # Ctrl-C mid-write: torch.save's writer then fails to close the file and raises its own
            # error, which would hide the interrupt (and its exit status 130)
            raise KeyboardInterrupt from None
        if isinstance(cause, OSError) and not isinstance(e, UserError):
            raise UserError(f"cannot write {path}: {cause.strerror or cause}") from e
        raise


def make_folder(path, setting):
    """os.makedirs(path, exist_ok=True), with a failure (read-only, a file in the way) as a
    UserError naming the setting that chose the folder."""
    if not path:
        raise UserError(f"{setting} must not be empty")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {setting} {path}: {e.strerror}") from None


def write_text(path, text):
    """The whole of `text` into the file at `path`, atomically."""
    with atomic_write(path) as f:
        f.write(text)
