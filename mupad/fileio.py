"""Crash-safe writes: a folder or file is written under a temporary name and renamed.

A reader never sees a half-written checkpoint; an interrupted write leaves only a
temporary sibling that the next write removes. An OSError about the output (read-only
folder, a file where a folder should be, disk full, ...) becomes an `OutputError` whose
one-line message names the output and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from mupad.errors import MupadError

# errno -> what the user can do about it, for OSErrors that concern a path.
PATH_HINTS = {
    errno.EACCES: "choose a writable location or fix the permissions",
    errno.EPERM: "choose a writable location or fix the permissions",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another location",
    errno.EFBIG: "the file is too large for this file system; choose another location",
    errno.ENOTDIR: "a file stands where a folder is expected; move it or choose another path",
    errno.EISDIR: "a folder stands where a file is expected; choose another path",
    errno.EEXIST: "something is in the way there; move it or choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}
# Failures of the device rather than of one path: their OSError often names no file.
DEVICE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class OutputError(MupadError):
    """An output cannot be written; the message names it, the reason and what to do."""


def describe_os_error(error: OSError, *, show_path: bool = True) -> str:
    """`path: reason (what to do)` for an OSError, on one line."""
    reason = error.strerror or str(error)
    hint = PATH_HINTS.get(error.errno or 0)
    where = ""
    if error.filename is not None and show_path:
        where = f"{os.fsdecode(error.filename)}: "
        if error.filename2 is not None:
            where = f"{os.fsdecode(error.filename)} -> {os.fsdecode(error.filename2)}: "
    return f"{where}{reason}" + (f" ({hint})" if hint else "")


def output_error(error: OSError | SafetensorError, final: str | Path) -> OutputError:
    """The OutputError for an error raised while writing `final` (the name of a temporary
    sibling it was being written to is left out)."""
    if not isinstance(error, OSError):
        return OutputError(f"cannot write {final}: {error}")
    scratch = error.filename is not None and os.path.basename(
        os.fsdecode(error.filename)
    ).startswith(f".{Path(final).name}.")
    return OutputError(f"cannot write {final}: {describe_os_error(error, show_path=not scratch)}")


def _about(error: OSError | SafetensorError, scratch: Path) -> bool:
    """True when `error` concerns writing the temporary output `scratch` (a file or folder)
    or the device it is on, rather than some input read while writing it."""
    if isinstance(error, SafetensorError):  # safetensors reports write failures as its own
        return "while serializing" in str(error)
    if error.filename is None:
        return error.errno in DEVICE_ERRNOS
    name = Path(os.fsdecode(error.filename))
    return name == scratch or scratch in name.parents


def make_parent(final: str | Path) -> None:
    """Create the folder `final` goes in (OutputError naming `final` when that fails)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # what mkdir says of a file where a folder should be
        in_the_way = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), error.filename)
        raise output_error(in_the_way, final) from error
    except OSError as error:
        raise output_error(error, final) from error


@contextlib.contextmanager
def _output_errors(final: Path, scratch: Path | None = None) -> Iterator[None]:
    """Turn a failure to write `final` into an OutputError: any OSError of the block (our own
    file operations) or, with `scratch`, only errors about writing the caller's `scratch`."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        ours = isinstance(error, OSError) if scratch is None else _about(error, scratch)
        if ours:
            raise output_error(error, final) from error
        raise


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` atomically."""
    final = Path(final)
    make_parent(final)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with _output_errors(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        # mkdtemp creates 0700 folders; give the result the permissions mkdir() would have.
        os.chmod(tmp, 0o777 & ~_current_umask())
    try:
        with _output_errors(final, tmp):
            yield tmp
        old = None
        with _output_errors(final):
            if final.exists():
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                os.replace(final, old)
            os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final` to write the file to; on success it is given
    the permissions open() would and renamed to `final`; on any error it is removed."""
    final = Path(final)
    make_parent(final)
    with _output_errors(final):
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with _output_errors(final, tmp):
            yield tmp
        with _output_errors(final):
            # mkstemp creates 0600 files; give the result the permissions open() would have.
            os.chmod(tmp, 0o666 & ~_current_umask())
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temporary sibling and an atomic rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
