"""Reading HDF5 files defensively (Cell BLAST ``.h5`` and h5ad are both HDF5): open with a
signature check, every h5py error as one DataError naming the file and member, declared sizes
checked against stored bytes before anything is read, virtual datasets, external storage and
external links whose sources are missing refused, and names that are not UTF-8 reported.
Importing does nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from errors import DataError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# h5py reports a damaged file, a dangling soft or external link, a missing member or a member of
# the wrong kind with any of these; each becomes one DataError naming the file and the member.
H5PY_ERRORS = (KeyError, OSError, TypeError, ValueError, RuntimeError, AttributeError)
# A filtered (compressed) dataset may declare more bytes than it stores, but deflate cannot do
# better than ~1032:1; a dataset declaring more than this is a header that lies about its size.
MAX_COMPRESSION_RATIO = 1100


def is_hdf5(path) -> bool:
    """Whether a file starts with the HDF5 signature (False for folders and unreadable files)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def decode_names(values, path, what: str) -> np.ndarray:
    """Byte strings (as Cell BLAST and anndata store them) to a 1-D numpy array of str; other
    shapes, and bytes that are not UTF-8, are one DataError naming the file."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{path}: {what} must be 1-D (one entry per cell or gene), got shape {arr.shape}; "
                        "write it as a flat array")
    if arr.dtype.kind == "S" or arr.dtype == object:
        try:
            return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr], dtype=object)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: {what} holds names that are not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start}); write them as UTF-8 strings") from None
    return arr.astype(str).astype(object)


@contextmanager
def reading(path, member: str):
    """Turn h5py's exceptions while reading ``member`` into one DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: '{member}' holds text that is not UTF-8 ({exc.reason}); write it as UTF-8 "
                        "strings") from None
    except H5PY_ERRORS as exc:
        raise DataError(f"{path}: cannot read '{member}' ({type(exc).__name__}: {exc}); the file is damaged or "
                        "not in the expected layout; download or write it again") from None


def open_h5(path: Path, kind: str = "a Cell BLAST .h5"):
    """An h5py file opened read-only, after checking it exists and is HDF5."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not {kind} file")
    if not is_hdf5(path):
        raise DataError(f"{path}: not an HDF5 file (expected {kind})")
    try:
        return h5py.File(path, "r")
    except H5PY_ERRORS as exc:
        raise DataError(f"{path}: cannot be opened as HDF5 ({exc})") from exc


def check_stored_size(dataset, path, member: str) -> None:
    """Refuse an HDF5 dataset that declares more bytes than its file can hold, before reading it.

    Unfiltered storage must hold every declared byte; filtered storage at most
    ``MAX_COMPRESSION_RATIO`` times what it stores (plus 1 MiB of slack for tiny datasets). A
    header asking for terabytes from a small file is refused instead of allocated. A virtual
    dataset must find every source file, and a dataset stored in external files every one of them.
    """
    import h5py

    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        check_virtual_sources(plist, path, member)
        return
    if plist.get_external_count() > 0:
        check_external_storage(plist, path, member)
        return
    declared = int(np.prod([int(s) for s in dataset.shape], dtype=object)) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    filtered = plist.get_nfilters() > 0
    limit = MAX_COMPRESSION_RATIO * stored + (1 << 20) if filtered else stored
    if declared > limit:
        raise DataError(f"{path}: '{member}' declares shape {tuple(dataset.shape)} ({declared:,} bytes) but the file "
                        f"stores {stored:,} bytes for it; the file is truncated or damaged; download or write it again")


def _source_file(name: bytes | str, path) -> Path | None:
    """A virtual or external source's file, relative to the file's folder; None for the file itself."""
    name = name.decode() if isinstance(name, bytes) else str(name)
    if name == ".":
        return None
    source = Path(name)
    return source if source.is_absolute() else Path(path).resolve().parent / source


def check_virtual_sources(plist, path, member: str) -> None:
    """Every source file of a virtual dataset exists (h5py reads a missing one as zeros)."""
    for i in range(plist.get_virtual_count()):
        source = _source_file(plist.get_virtual_filename(i), path)
        if source is not None and not source.exists():
            raise DataError(f"{path}: '{member}' is a virtual dataset whose source {source} is missing; its values "
                            "would read as zeros; put the source file back or write the data into the file itself")


def check_external_storage(plist, path, member: str) -> None:
    for i in range(plist.get_external_count()):
        name = plist.get_external(i)[0]
        source = _source_file(name, path)
        if source is not None and not source.exists():
            raise DataError(f"{path}: '{member}' stores its values in the external file {source}, which is missing; "
                            "put it back or write the data into the file itself")


def check_links(h5, path) -> None:
    """Every external link of the file points at a file that exists (with its member)."""
    import h5py

    def walk(group, prefix):
        for name in group.keys():
            link = group.get(name, getlink=True)
            member = f"{prefix}{name}"
            if isinstance(link, h5py.ExternalLink):
                target = _source_file(link.filename, path)
                if target is not None and not target.exists():
                    raise DataError(f"{path}: '{member}' is an external link to {target}, which is missing; put it "
                                    "back or write the data into the file itself")
            if isinstance(link, h5py.HardLink) and isinstance(group[name], h5py.Group):
                walk(group[name], f"{member}/")

    with reading(path, "the file's links"):
        walk(h5, "")


def check_all_stored_sizes(h5, path) -> None:
    """:func:`check_links`, then :func:`check_stored_size` of every dataset in an open HDF5 file."""
    import h5py

    check_links(h5, path)

    def visit(name, node):
        if isinstance(node, h5py.Dataset):
            check_stored_size(node, path, name)

    with reading(path, "the file's members"):
        h5.visititems(visit)


def h5_dataset(h5, member: str, path):
    """``h5[member]`` as a dataset whose declared size the file can hold."""
    import h5py

    with reading(path, member):
        node = h5[member]
        if not isinstance(node, h5py.Dataset):
            raise DataError(f"{path}: '{member}' is a group, expected an array; write it as one dataset")
        check_stored_size(node, path, member)
    return node


def read_h5_array(h5, member: str, path) -> np.ndarray:
    node = h5_dataset(h5, member, path)
    with reading(path, member):
        return node[()]
