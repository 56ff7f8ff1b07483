"""Writing files safely: atomic writes, outputs checked before any work, no output onto an input,
and locks for files that several runs may update. Importing does nothing.

Every writer of the project goes through :func:`atomic_write` or :func:`atomic_write_path`: the
new content goes to a hidden temporary file beside the target and is renamed over it only once
complete, so a failed write (a full disk, a vanished folder, Ctrl-C) leaves the earlier file as
it was and no temporary file behind, and ends as one :class:`errors.OutputError`.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping

from errors import OutputError

# what a writer raises when the file system fails it: OSError (ENOSPC, EIO, ...) from Python's own
# files and h5py; torch.save's zip writer reports the same as RuntimeError
WRITE_ERRORS = (OSError, RuntimeError)
# an output must leave at least this much free beside what it is expected to take (HDF5 crashes
# instead of failing cleanly when the disk fills under it)
FREE_MARGIN_BYTES = 16 << 20


def _permissions_as_open(tmp: str) -> None:
    """The permissions a plain ``open`` would give a new file (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def atomic_write_path(path, write_fn, expected_bytes: int = 0) -> Path:
    """Call ``write_fn(temporary_path)`` (for writers that take a file name), then rename the
    temporary file over ``path``. With ``expected_bytes``, a disk without that much room (plus a
    margin) is refused before anything is written. Any failure removes the temporary file, keeps
    an existing ``path`` as it was and raises one OutputError naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if expected_bytes:
            check_free_space(path.parent, expected_bytes, path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({_reason(exc)}); choose another path") from None
    try:
        write_fn(tmp)
        _permissions_as_open(tmp)
        os.replace(tmp, path)
    except WRITE_ERRORS as exc:
        kept = "the earlier file is kept" if path.exists() else "nothing was written"
        raise OutputError(f"{path}: writing failed ({_reason(exc)}); {kept}. Free some space or choose "
                          "another path, then run again") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write(path, write_fn, mode: str = "w", expected_bytes: int = 0) -> Path:
    """Call ``write_fn(fileobj)`` on a temporary file next to ``path``, then rename it over ``path``
    (see :func:`atomic_write_path`)."""

    def write(tmp: str) -> None:
        with open(tmp, mode) as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())  # a full disk shows here, not after the rename

    return atomic_write_path(path, write, expected_bytes)


def check_free_space(folder, needed: int, shown) -> None:
    """Refuse to start a write of about ``needed`` bytes where the file system has less free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the write itself will say
    if free < needed + FREE_MARGIN_BYTES:
        raise OutputError(f"{shown}: needs about {human_bytes(needed)} (and {human_bytes(FREE_MARGIN_BYTES)} to "
                          f"spare) but its file system has {human_bytes(free)} free; free some space or choose "
                          "another path")


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


# --------------------------------------------------------------------------- output paths


def check_output_file(path, flag: str) -> Path:
    """Before any data is read: ``path`` can be written as a file (not a folder; its folder exists
    or can be made, and takes a new file). Errors name the flag."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; give a file path")
    check_output_dir(path.parent, flag, path)
    return path


def check_output_dir(folder, flag: str, shown=None) -> Path:
    """``folder`` exists or can be made, and a file can be created in it."""
    folder, shown = Path(folder), shown or folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"{flag} {shown}: cannot write there ({exc.strerror or exc}); "
                          "choose a writable path") from None
    return folder


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same resolved path (symlinks, ``..``, relative
    spellings), or, when both exist, the same inode (hard links, bind mounts)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _as_list(paths) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths if p is not None]


def refuse_clashes(outputs: Mapping[str, object], inputs: Mapping[str, object]) -> None:
    """Refuse, before any work, to write a file that is one of the run's inputs, or the same file
    for two outputs. ``outputs`` and ``inputs`` map a flag (as the user wrote it, e.g. ``--out`` or
    ``--out (CSV beside it)``) to a path or paths; a folder input (a numpy dataset) is compared by
    the files in it."""
    seen: list[tuple[str, Path]] = []
    for flag, paths in outputs.items():
        for path in _as_list(paths):
            for in_flag, in_path in _expand_inputs(inputs):
                if same_file(path, in_path):
                    raise OutputError(f"{flag} {path} is the same file as the input {in_flag} {in_path}; "
                                      "an input is never overwritten: choose another output path")
            for other_flag, other in seen:
                if same_file(path, other) and other_flag != flag:
                    raise OutputError(f"{flag} {path} is the same file as {other_flag} {other}; "
                                      "choose different output paths")
            seen.append((flag, path))


def _expand_inputs(inputs: Mapping[str, object]) -> Iterable[tuple[str, Path]]:
    for flag, paths in inputs.items():
        for path in _as_list(paths):
            if path.is_dir():
                for child in sorted(path.iterdir()):
                    yield flag, child
            else:
                yield flag, path


# --------------------------------------------------------------------------- locks


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def locked(path):
    """Hold an exclusive lock on ``path`` (through a hidden ``.NAME.lock`` beside it) for a
    read-modify-write: two runs appending to one results file then take turns instead of losing
    each other's rows. The lock is released when the block ends or the process dies."""
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "a")
    except OSError as exc:
        raise OutputError(f"{path}: cannot take its lock {lock} ({_reason(exc)}); choose a writable path") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """A matplotlib figure written atomically, in the format of ``path``'s suffix (png, pdf, ...)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write_path(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
