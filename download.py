"""Fetching Cell BLAST datasets: where a dataset lives locally, and a resumable download.

Cell BLAST serves its datasets as ``{name}/{name}.h5ad`` (since 2022; the ``.h5`` layout is
:data:`LEGACY_URL_TEMPLATE`). A download goes to a hidden partial file beside its destination,
``.NAME.h5ad.part``, with a JSON sidecar ``.NAME.h5ad.part.json`` (URL, total size, the server's
ETag / Last-Modified). Only a complete file that starts as HDF5 is renamed over the destination.
An interrupted download (a dropped connection, a killed process, Ctrl-C) keeps both, and the next
call for the same URL asks for the rest with an HTTP ``Range`` request. Every failure is one
:class:`errors.DataError` naming the dataset and the URL. Importing this module does nothing.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO, Iterator

from errors import DataError

try:
    import fcntl
except ImportError:  # not POSIX: no lock between processes downloading the same file
    fcntl = None

log = logging.getLogger("scpretrain.download")

DEFAULT_URL_TEMPLATE = "https://cblast.gao-lab.org/{name}/{name}.h5ad"
LEGACY_URL_TEMPLATE = "https://cblast.gao-lab.org/{name}/{name}.h5"
DATASET_SUFFIXES = (".h5ad", ".h5")  # the order a local file is looked for
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CHUNK_BYTES = 1 << 20
RESUMABLE_SCHEMES = ("http", "https")
CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- where a dataset is


def dataset_suffix(url_template: str) -> str:
    """``.h5ad`` or ``.h5``, from the end of the template's URL path (default ``.h5ad``)."""
    path = urllib.parse.urlsplit(url_template).path.lower()
    return ".h5" if path.endswith(".h5") else ".h5ad"


def local_dataset(name: str, dataset_dir) -> Path | None:
    """``dataset_dir/NAME.h5ad`` or else ``dataset_dir/NAME.h5``, whichever exists first; None if neither."""
    for suffix in DATASET_SUFFIXES:
        path = Path(dataset_dir) / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def looks_like_path(name_or_path: str) -> bool:
    """A ``.h5`` / ``.h5ad`` file name, an existing folder, or anything with a path separator."""
    separators = [s for s in (os.sep, os.altsep) if s]
    return (Path(name_or_path).suffix.lower() in DATASET_SUFFIXES or Path(name_or_path).is_dir()
            or any(s in name_or_path for s in separators))


def resolve_dataset_path(name_or_path: str, dataset_dir, url_template: str = DEFAULT_URL_TEMPLATE,
                         timeout: float = 30.0) -> Path:
    """A path as given (it must exist), else a local file of either layout in ``dataset_dir``,
    else ``dataset_dir/NAME{suffix of the template}`` downloaded first."""
    if looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.exists():
            raise DataError(f"{path}: file not found")
        return path
    local = local_dataset(name_or_path, dataset_dir)
    if local is not None:
        return local
    dest = Path(dataset_dir) / f"{name_or_path}{dataset_suffix(url_template)}"
    return download_dataset(name_or_path, dest, url_template, timeout)


# --------------------------------------------------------------------------- the download


NETWORK_ADVICE = "Check the network and run the same command again"
NAME_ADVICE = "Check the dataset name and --url_template"
CONTENT_ADVICE = "Check that --url_template points at the dataset file itself"


class DownloadFailed(Exception):
    """Why one download failed, what to do about it, and whether its partial file is worth
    keeping for the next try (``resumable``)."""

    def __init__(self, reason: str, resumable: bool, advice: str = NETWORK_ADVICE):
        super().__init__(reason)
        self.reason, self.resumable, self.advice = reason, resumable, advice


class RestartOnce(Exception):
    """The server cannot continue the partial file (416, or a Content-Range for other bytes)."""


@dataclass
class Part:
    """The partial file of one download (open for appending, locked) and its sidecar."""

    path: Path
    url: str
    fh: BinaryIO

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def size(self) -> int:
        return os.fstat(self.fh.fileno()).st_size

    def read_meta(self) -> dict | None:
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def write_meta(self, total: int | None, etag: str | None, last_modified: str | None) -> None:
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_text(json.dumps({"url": self.url, "total": total, "etag": etag, "last_modified": last_modified}))
        os.replace(tmp, self.sidecar)

    def restart(self) -> None:
        """Back to zero bytes, with no sidecar (a new one is written once the server answers)."""
        self.sidecar.unlink(missing_ok=True)
        self.fh.truncate(0)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)


def download_dataset(name: str, dest, url_template: str = DEFAULT_URL_TEMPLATE, timeout: float = 30.0) -> Path:
    """Fetch ``url_template.format(name=name)`` to ``dest``, resuming an interrupted download.

    Any failure raises one DataError naming the dataset and the URL and saying what to do;
    ``dest`` itself is only ever replaced by a complete, checked file.
    """
    url = dataset_url(url_template, name)
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest)
        with locked_part(partial_path(dest), url) as (part, waited):
            if waited and dest.exists():  # another process finished this download while we waited
                part.discard()
            else:
                download_into(part, name, dest, timeout)
    except OSError as exc:  # the folder itself: not creatable, not writable
        raise DataError(f"cannot download dataset '{name}' from {url}: cannot write in {dest.parent} "
                        f"({exc.strerror or exc}); choose another --dataset_dir, or place {dest.name} in "
                        f"{dest.parent} by hand.") from None
    return dest


def download_into(part: Part, name: str, dest: Path, timeout: float) -> None:
    """Complete the partial file and rename it to ``dest``; a failure keeps it only if it can be resumed."""
    try:
        fetch(part, name, timeout)
        install(part, dest)
    except DownloadFailed as exc:
        kept = settle_failed_part(part, exc.resumable)
        raise DataError(failure_message(name, part.url, dest, exc, kept)) from None


def dataset_url(url_template: str, name: str) -> str:
    try:
        return url_template.format(name=name)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"cannot download dataset '{name}': the URL template {url_template!r} is not valid "
                        f"({type(exc).__name__}: {exc}); write it with {{name}} where the dataset name goes") from None


def partial_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part")


def remove_stale_temporaries(dest: Path) -> None:
    """Delete ``.NAME.h5.*.part`` / ``.NAME.h5ad.*.part``, left by the earlier, non-resumable download code."""
    stem = dest.name[: -len(dest.suffix)] if dest.suffix.lower() in DATASET_SUFFIXES else dest.name
    for suffix in DATASET_SUFFIXES:
        for stale in dest.parent.glob(f".{glob_escape(stem + suffix)}.*.part"):
            try:
                stale.unlink()
                log.info("removed %s, left by an interrupted download", stale.name)
            except FileNotFoundError:  # another process removed it first
                pass


@contextmanager
def locked_part(path: Path, url: str) -> Iterator[tuple[Part, bool]]:
    """The partial file, opened for appending and locked against another process downloading the
    same file (the second waits); yields it and whether it had to wait."""
    waited = False
    while True:
        fh = open(path, "ab")  # created as a plain open() creates files: the umask applies
        try:
            waited |= lock(fh, path)
        except BaseException:
            fh.close()
            raise
        if same_file(fh, path):
            break
        fh.close()  # the file waited on was renamed or removed meanwhile: open the current one
    try:
        yield Part(path, url, fh), waited
    finally:
        fh.close()  # releases the lock


def lock(fh: BinaryIO, path: Path) -> bool:
    """Lock ``fh`` exclusively; True if another process held it first."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        log.info("waiting for another process downloading %s", path.name)
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        return True


def same_file(fh: BinaryIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def fetch(part: Part, name: str, timeout: float) -> None:
    """Bring the partial file to completion: resume it when possible, else start from zero
    (a server that cannot continue it is asked once more for the whole file)."""
    log.info("downloading %s from %s", name, part.url)
    try:
        transfer(part, name, resume_offset(part, name), timeout)
    except RestartOnce as why:
        log.info("%s: %s; downloading again from zero", name, why)
        part.restart()
        try:
            transfer(part, name, 0, timeout)
        except RestartOnce as again:
            raise DownloadFailed(str(again), resumable=False, advice=CONTENT_ADVICE) from None


def resume_offset(part: Part, name: str) -> int:
    """How many bytes of the partial file can be kept (0 after discarding it, with the reason logged)."""
    size = part.size()
    if size == 0:
        return 0
    meta = part.read_meta()
    why = discard_reason(part, meta, size)
    if why:
        log.info("%s: discarding %s (%d bytes): %s", name, part.path.name, size, why)
        part.restart()
        return 0
    return size


def discard_reason(part: Part, meta: dict | None, size: int) -> str | None:
    if urllib.parse.urlsplit(part.url).scheme.lower() not in RESUMABLE_SCHEMES:
        return "only http(s) downloads are resumed"
    if meta is None:
        return f"no readable {part.sidecar.name} says where it came from"
    if meta.get("url") != part.url:
        return f"it was downloaded from {meta.get('url')}, not {part.url}"
    if isinstance(meta.get("total"), int) and size > meta["total"]:
        return f"it is larger than the {meta['total']} bytes the server announced"
    return None


def transfer(part: Part, name: str, offset: int, timeout: float) -> None:
    """One request (for the bytes from ``offset`` on) whose body is appended to the partial file."""
    meta = part.read_meta() if offset else None
    try:
        with urllib.request.urlopen(range_request(part.url, offset, meta), timeout=timeout) as response:
            offset, total = accept_answer(part, name, response, offset, meta)
            copy_body(response, part, name, offset, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            raise RestartOnce(f"the server cannot continue from byte {offset:,} (416)") from None
        raise http_failure(exc) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadFailed(str(getattr(exc, "reason", None) or exc) or type(exc).__name__, resumable=True) \
            from None
    except ValueError as exc:  # a URL urllib cannot open
        raise DownloadFailed(str(exc), resumable=False, advice=NAME_ADVICE) from None
    check_complete(part, total)


def http_failure(exc: urllib.error.HTTPError) -> DownloadFailed:
    """A server error or a rate limit may pass (the part is kept); any other error status will not."""
    transient = exc.code >= 500 or exc.code in (408, 429)
    return DownloadFailed(f"HTTP {exc.code} {exc.reason}", resumable=transient,
                          advice=NETWORK_ADVICE if transient else NAME_ADVICE)


def range_request(url: str, offset: int, meta: dict | None) -> urllib.request.Request:
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = if_range_validator(meta)
        if validator:
            headers["If-Range"] = validator
    return urllib.request.Request(url, headers=headers)


def if_range_validator(meta: dict | None) -> str | None:
    """A strong ETag, else Last-Modified (If-Range takes no weak ETag)."""
    if not meta:
        return None
    etag = meta.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return meta.get("last_modified")


def accept_answer(part: Part, name: str, response, offset: int, meta: dict | None) -> tuple[int, int | None]:
    """Where the body goes and the file's total size: appended after a matching 206, from zero
    after a 200 (or a file:// answer). The sidecar is written before any byte of the body."""
    status = getattr(response, "status", None) or response.getcode()
    if status == 206:
        start, total = content_range(response, offset, meta)
        log.info("%s: resuming from %s bytes of %s", name, f"{start:,}", f"{total:,}" if total else "?")
    else:
        total = content_length(response)
        if offset:
            log.info("%s: the server sent the whole file (no range support, or the file changed); "
                     "starting again from zero", name)
            part.restart()
        start = 0
    part.write_meta(total, response.headers.get("ETag"), response.headers.get("Last-Modified"))
    return start, total


def content_range(response, offset: int, meta: dict | None) -> tuple[int, int | None]:
    """The start and total of a 206's ``Content-Range``; RestartOnce unless it continues the partial file."""
    header = response.headers.get("Content-Range", "")
    match = CONTENT_RANGE.match(header)
    total = int(match.group(3)) if match and match.group(3) != "*" else None
    known = meta.get("total") if meta else None
    if not match or int(match.group(1)) != offset or (total and known and total != known):
        raise RestartOnce(f"the server answered Content-Range '{header}' to a request for bytes {offset:,} on"
                          + (f" of {known:,}" if known else ""))
    return offset, total or known


def content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def copy_body(response, part: Part, name: str, offset: int, total: int | None) -> None:
    with progress_bar(total=total, initial=offset, desc=name) as bar:
        while True:
            block = read_block(response, part)
            if not block:
                break
            part.fh.write(block)
            bar.update(len(block))
    part.fh.flush()


def read_block(response, part: Part) -> bytes:
    """The next block of the body; the bytes of a block cut short are kept before failing."""
    try:
        return response.read(CHUNK_BYTES)
    except http.client.IncompleteRead as exc:  # a chunked body that ended early: keep what came
        part.fh.write(exc.partial)
        part.fh.flush()
        raise


def progress_bar(total: int | None, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, leave=False,
                disable=None)


def check_complete(part: Part, total: int | None) -> None:
    """A short file can be resumed; a longer one, or one that is not HDF5, is corrupt."""
    size = part.size()
    if total is not None and size < total:
        raise DownloadFailed(f"received {size:,} of {total:,} bytes (the connection ended early)", resumable=True)
    if total is not None and size > total:
        raise DownloadFailed(f"the file has {size:,} bytes, the server announced {total:,}", resumable=False,
                             advice=CONTENT_ADVICE)
    with open(part.path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise DownloadFailed(f"the server did not send an HDF5 file (it starts with {head!r})", resumable=False,
                             advice=CONTENT_ADVICE)


def install(part: Part, dest: Path) -> None:
    """Rename the checked partial file over ``dest``, then drop its sidecar."""
    try:
        os.replace(part.path, dest)
    except OSError as exc:
        raise DownloadFailed(f"cannot rename it to {dest} ({exc.strerror or exc})", resumable=True) from None
    part.sidecar.unlink(missing_ok=True)


def settle_failed_part(part: Part, resumable: bool) -> int:
    """Keep a resumable, non-empty partial file and its sidecar; remove anything else. Returns the bytes kept."""
    size = part.size() if part.path.exists() else 0
    if resumable and size:
        return size
    part.discard()
    return 0


def failure_message(name: str, url: str, dest: Path, failed: DownloadFailed, kept: int) -> str:
    resume = f" (it resumes from the {kept:,} bytes kept in {partial_path(dest)})" if kept else ""
    return (f"cannot download dataset '{name}' from {url}: {failed.reason}. {failed.advice}{resume}; "
            f"or place {dest.name} in {dest.parent} by hand.")
