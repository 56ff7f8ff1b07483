"""download.py against a local HTTP server (http.server in a thread): where a dataset is found,
downloads of both layouts, resuming an interrupted download, every failure, and main.py end to end."""
from __future__ import annotations

import http.server
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import data
from settings import ReadSettings
import download
from errors import DataError
from helpers import toy_counts, toy_dataset_file
import genes as gn
import values

ROOT = Path(__file__).resolve().parent.parent
SERVER_TIMEOUT_S = 5  # no request handler or client read may block longer than this
ORTHOLOGS = gn.ORTHOLOG_TABLE


# --------------------------------------------------------------------------- tiny Cell BLAST h5ad files


def orthologous_genes(n: int) -> tuple[list[str], list[str]]:
    """``n`` real (human, mouse) one-to-one ortholog symbol pairs, the mouse ones mapping back."""
    table = pd.read_csv(ORTHOLOGS, usecols=["human__gene_name", "mouse__gene_name"]).dropna()
    table = table[~table["mouse__gene_name"].str.upper().duplicated(keep=False)]
    table = table[~table["human__gene_name"].str.upper().duplicated(keep=False)].head(n)
    return list(table["human__gene_name"]), list(table["mouse__gene_name"])


def write_cellblast_h5ad(path, n_cells=40, genes=None, labelled=True, seed=0) -> Path:
    """The layout of Cell BLAST's ``h5_to_h5ad``: X CSR float counts, ``obs['cell_ontology_class']``,
    gene symbols as ``var_names``."""
    genes = genes if genes is not None else [f"GENE{i}" for i in range(12)]
    counts, types = toy_counts(n_cells, len(genes), n_types=3, seed=seed)
    obs = pd.DataFrame({"organism": np.array(["x"] * n_cells, dtype=object)},
                       index=pd.Index([f"cell{i}" for i in range(n_cells)], dtype=object))
    if labelled:
        obs["cell_ontology_class"] = pd.Categorical(np.array([f"type {t}" for t in types], dtype=object))
    adata = anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs,
                            var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    adata.write_h5ad(path)
    return Path(path)


@pytest.fixture(scope="module")
def h5ad_bytes(tmp_path_factory):
    return write_cellblast_h5ad(tmp_path_factory.mktemp("src") / "toy.h5ad", n_cells=60).read_bytes()


@pytest.fixture(scope="module")
def other_h5ad_bytes(tmp_path_factory):
    """Another version of the same dataset (the file changed on the server)."""
    return write_cellblast_h5ad(tmp_path_factory.mktemp("src") / "toy.h5ad", n_cells=80, seed=5).read_bytes()


@pytest.fixture(scope="module")
def h5_bytes(tmp_path_factory):
    return toy_dataset_file(tmp_path_factory.mktemp("src") / "toy.h5", n_cells=20, n_genes=10).read_bytes()


# --------------------------------------------------------------------------- the fake server


@dataclass
class Served:
    path: str
    range: str | None
    if_range: str | None
    status: int
    body_bytes: int  # bytes of body sent


@dataclass
class ServerState:
    """What the server serves and how; what it was asked. Tests change the fields between calls."""

    files: dict = field(default_factory=dict)  # URL path -> bytes
    ranges: bool = True  # honour Range (206 + Content-Range); False: always 200 with the whole file
    etag: str | None = None  # sent as ETag; an If-Range other than it gets the whole file
    cuts: list = field(default_factory=list)  # per response, in order: send this many body bytes, then close
    statuses: list = field(default_factory=list)  # per request, in order: answer with this error status
    chunked: bool = False  # Transfer-Encoding: chunked instead of Content-Length
    content_range_shift: int = 0  # a 206 announcing bytes other than those asked for
    extra: bytes = b""  # a 206 sending these bytes past the end of the file
    delay: float = 0.0  # seconds before a body is sent
    log: list = field(default_factory=list)

    @property
    def body_bytes(self) -> int:
        return sum(s.body_bytes for s in self.log)


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = SERVER_TIMEOUT_S  # a stuck client cannot hold a handler forever

    def do_GET(self):
        st: ServerState = self.server.state
        body = st.files.get(self.path)
        status = st.statuses.pop(0) if st.statuses else (404 if body is None else None)
        if status is not None:
            self._record(status, 0)
            return self.send_error(status)
        start = self._range_start(st)
        if start is not None and start >= len(body):
            self._record(416, 0)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        payload = body[start or 0:] + (st.extra if start is not None else b"")
        cut = st.cuts.pop(0) if st.cuts else None
        sent = payload if cut is None else payload[:cut]
        self._record(200 if start is None else 206, len(sent))
        self._headers(st, body, start, payload)
        time.sleep(st.delay)
        self._body(st, sent, complete=cut is None)

    def _range_start(self, st: ServerState) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if not (st.ranges and match):
            return None
        if_range = self.headers.get("If-Range")
        return None if if_range is not None and if_range != st.etag else int(match.group(1))

    def _headers(self, st, body, start, payload):
        if st.chunked:
            self.protocol_version = "HTTP/1.1"
        self.send_response(200 if start is None else 206)
        self.send_header("Content-Type", "application/octet-stream")
        if start is not None:
            self.send_header("Content-Range", f"bytes {start + st.content_range_shift}-{len(body) - 1}/{len(body)}")
        if st.etag:
            self.send_header("ETag", st.etag)
        if st.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()

    def _body(self, st, sent, complete):
        if st.chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(sent), sent) + (b"0\r\n\r\n" if complete else b""))
        else:
            self.wfile.write(sent)
        self.wfile.flush()
        self.close_connection = True

    def _record(self, status, n):
        self.server.state.log.append(Served(self.path, self.headers.get("Range"), self.headers.get("If-Range"),
                                            status, n))

    def log_message(self, *args):  # keep test output quiet
        pass


@dataclass
class Server:
    url: str
    state: ServerState

    def template(self, route="/{name}/{name}.h5ad") -> str:
        return self.url + route


@pytest.fixture
def server():
    """A server on 127.0.0.1 (port 0) in a daemon thread, shut down after the test."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    httpd.daemon_threads = True
    httpd.timeout = SERVER_TIMEOUT_S
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state)
    finally:
        httpd.shutdown()  # ends serve_forever within one poll interval
        httpd.server_close()
        thread.join(timeout=SERVER_TIMEOUT_S)
        assert not thread.is_alive()


@pytest.fixture
def toy(server, h5ad_bytes):
    """The server serves toy.h5ad at /toy/toy.h5ad; the test's URL template for it."""
    server.state.files["/toy/toy.h5ad"] = h5ad_bytes
    return server.template()


def leftovers(folder):
    """Files a failed or finished download might leave behind (partial files included)."""
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


PART, SIDECAR = ".toy.h5ad.part", ".toy.h5ad.part.json"


def get(template, dest, **kw):
    return download.download_dataset("toy", dest, template, timeout=SERVER_TIMEOUT_S, **kw)


def failure(template, dest) -> str:
    """The one DataError message of a failing download of 'toy' (it names the dataset and URL)."""
    with pytest.raises(DataError) as err:
        get(template, dest)
    message = str(err.value)
    assert "'toy'" in message and template.format(name="toy") in message and "\n" not in message
    return message


# --------------------------------------------------------------------------- where a dataset is


@pytest.mark.parametrize("template, suffix", [
    (download.DEFAULT_URL_TEMPLATE, ".h5ad"), (download.LEGACY_URL_TEMPLATE, ".h5"),
    ("http://mirror/{name}.H5", ".h5"), ("http://mirror/{name}.H5AD", ".h5ad"),
    ("file:///srv/{name}.h5", ".h5"), ("http://mirror/get?name={name}&format=h5", ".h5ad"),
    ("http://mirror/{name}.h5?token=1", ".h5"),
])
def test_dataset_suffix(template, suffix):
    assert download.dataset_suffix(template) == suffix


def test_default_templates():
    assert download.DEFAULT_URL_TEMPLATE == "https://cblast.gao-lab.org/{name}/{name}.h5ad"
    assert download.LEGACY_URL_TEMPLATE == "https://cblast.gao-lab.org/{name}/{name}.h5"
    assert download.DEFAULT_URL_TEMPLATE == download.DEFAULT_URL_TEMPLATE and data.DataError is DataError


def test_importing_download_does_nothing():
    out = subprocess.run([sys.executable, "-c", "import sys, download; print('tqdm' in sys.modules)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False" and out.stderr == ""


def test_local_dataset_either_layout(tmp_path):
    assert download.local_dataset("toy", tmp_path) is None
    (tmp_path / "toy.h5").write_bytes(b"x")
    assert download.local_dataset("toy", tmp_path) == tmp_path / "toy.h5"
    (tmp_path / "toy.h5ad").write_bytes(b"x")
    assert download.local_dataset("toy", tmp_path) == tmp_path / "toy.h5ad"  # h5ad first
    assert download.local_dataset("toy", tmp_path / "absent") is None


@pytest.mark.parametrize("layout", [".h5ad", ".h5"])
def test_resolve_finds_local_file_without_any_request(server, tmp_path, layout):
    (tmp_path / f"toy{layout}").write_bytes(b"anything")
    for template in (server.template(), server.template("/{name}/{name}.h5")):
        assert download.resolve_dataset_path("toy", tmp_path, template, timeout=SERVER_TIMEOUT_S) == \
            tmp_path / f"toy{layout}"
    assert server.state.log == []


def test_resolve_downloads_default_h5ad_once(toy, server, tmp_path, h5ad_bytes):
    dataset_dir = tmp_path / "dataset"
    path = download.resolve_dataset_path("toy", dataset_dir, toy, timeout=SERVER_TIMEOUT_S)
    assert path == dataset_dir / "toy.h5ad" and path.read_bytes() == h5ad_bytes
    assert download.resolve_dataset_path("toy", dataset_dir, toy, timeout=SERVER_TIMEOUT_S) == path
    assert [s.path for s in server.state.log] == ["/toy/toy.h5ad"]
    assert leftovers(dataset_dir) == ["toy.h5ad"]


def test_resolve_downloads_legacy_h5(server, tmp_path, h5_bytes):
    server.state.files["/toy/toy.h5"] = h5_bytes
    path = download.resolve_dataset_path("toy", tmp_path, server.template("/{name}/{name}.h5"),
                                         timeout=SERVER_TIMEOUT_S)
    assert path == tmp_path / "toy.h5" and path.read_bytes() == h5_bytes
    assert data.read_any(path).n_cells == 20 and leftovers(tmp_path) == ["toy.h5"]


def test_resolve_failure_names_dataset_and_url(server, tmp_path):
    with pytest.raises(DataError) as err:
        download.resolve_dataset_path("Baron_human", tmp_path, server.template(), timeout=SERVER_TIMEOUT_S)
    assert "'Baron_human'" in str(err.value) and server.url + "/Baron_human/Baron_human.h5ad" in str(err.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("given", ["absent.h5", "absent.H5AD", "sub/absent", "absent.h5ad"])
def test_resolve_explicit_paths_must_exist(server, tmp_path, given):
    with pytest.raises(DataError, match="file not found"):
        download.resolve_dataset_path(str(tmp_path / given), tmp_path / "unused", server.template())
    assert server.state.log == [] and not (tmp_path / "unused").exists()  # nothing was downloaded


def test_resolve_explicit_paths_as_given(tmp_path):
    local = toy_dataset_file(tmp_path / "mine.H5", n_cells=5, n_genes=4)
    assert download.resolve_dataset_path(str(local), tmp_path / "unused") == local
    folder = tmp_path / "npy"
    folder.mkdir()
    assert download.resolve_dataset_path(str(folder), tmp_path / "unused") == folder
    assert not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------- complete downloads


def test_download_success(toy, tmp_path, h5ad_bytes):
    dest = tmp_path / "dl" / "toy.h5ad"
    assert get(toy, dest) == dest
    assert dest.read_bytes() == h5ad_bytes and leftovers(dest.parent) == ["toy.h5ad"]  # no partial file left


def test_downloaded_file_has_normal_permissions(toy, tmp_path):
    umask = os.umask(0o027)
    try:
        dest = get(toy, tmp_path / "toy.h5ad")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~0o027


def test_download_file_url(tmp_path, h5ad_bytes):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "toy.h5ad").write_bytes(h5ad_bytes)
    dest = tmp_path / "dl" / "toy.h5ad"
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / PART).write_bytes(b"stale bytes of an http download")  # not resumed over file://
    assert download.download_dataset("toy", dest, f"file://{src}/{{name}}.h5ad") == dest
    assert dest.read_bytes() == h5ad_bytes and leftovers(dest.parent) == ["toy.h5ad"]


def test_download_missing_file_url(tmp_path):
    template = f"file://{tmp_path}/nowhere/{{name}}.h5ad"
    failure(template, tmp_path / "dl" / "toy.h5ad")
    assert leftovers(tmp_path / "dl") == []


def test_load_collection_downloads_and_reads_h5ad(toy, tmp_path):
    datasets = data.load_collection(["toy"], ReadSettings(dataset_dir=str(tmp_path), url_template=toy))
    assert [d.name for d in datasets] == ["toy"] and datasets[0].n_cells == 60 and datasets[0].is_labelled
    np.testing.assert_array_equal(datasets[0].genes, [f"GENE{i}" for i in range(12)])
    assert leftovers(tmp_path) == ["toy.h5ad"]


def test_read_any_reads_cellblast_h5ad_layout(tmp_path):
    genes = ["CD3E", "MS4A1", "LYZ", "NKG7"]
    path = write_cellblast_h5ad(tmp_path / "cb.H5AD", n_cells=30, genes=genes)
    d = data.read_any(path)
    counts, types = toy_counts(30, 4, n_types=3, seed=0)
    assert d.is_labelled and d.values == values.RAW_VALUES and d.species == "human"
    assert sorted(set(d.labels)) == sorted({f"type {t}" for t in types})
    np.testing.assert_array_equal(d.genes, genes)
    np.testing.assert_array_equal(d.X.toarray(), counts)


def test_demo_reads_the_embedded_h5_files_and_bare_names_find_them():
    names = data.expand_dataset_names(["demo"])
    assert [Path(n) for n in names] == [data.DATASET_DIR / f"{d}.h5" for d in data.DEMO_DATASETS]
    for name in data.DEMO_DATASETS:  # no other layout of a demo name beside it: a bare name finds the same file
        assert download.local_dataset(name, data.DATASET_DIR) == data.DATASET_DIR / f"{name}.h5"


# --------------------------------------------------------------------------- resuming


def test_interrupted_download_resumes_with_a_range_request(toy, server, tmp_path, h5ad_bytes, caplog):
    n = len(h5ad_bytes) // 3
    server.state.cuts = [n]
    message = failure(toy, tmp_path / "toy.h5ad")
    assert "run the same command again" in message and f"{n:,} bytes" in message
    assert leftovers(tmp_path) == [PART, SIDECAR] and (tmp_path / PART).read_bytes() == h5ad_bytes[:n]
    meta = json.loads((tmp_path / SIDECAR).read_text())
    assert meta["url"] == toy.format(name="toy") and meta["total"] == len(h5ad_bytes)
    with caplog.at_level("INFO", logger="scpretrain.download"):
        assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    second = server.state.log[1]
    assert (second.range, second.status, second.body_bytes) == (f"bytes={n}-", 206, len(h5ad_bytes) - n)
    assert server.state.body_bytes == len(h5ad_bytes)  # every byte sent once
    assert f"resuming from {n:,} bytes of {len(h5ad_bytes):,}" in caplog.text
    assert leftovers(tmp_path) == ["toy.h5ad"]


@pytest.mark.parametrize("shape", ["cut", "big cut", "chunked cut"])
def test_truncated_body_keeps_the_part_and_the_rerun_resumes(toy, server, tmp_path, h5ad_bytes, shape):
    """A full 200 whose body ends early (Content-Length unmet, past the first 1 MiB read, or a
    chunked body with no last chunk): the part is kept, and the next call finishes it."""
    body = h5ad_bytes + (bytes(3 << 20) if shape == "big cut" else b"")
    server.state.files["/toy/toy.h5ad"] = body
    server.state.chunked = shape == "chunked cut"
    server.state.cuts = [len(body) // 2]
    failure(toy, tmp_path / "toy.h5ad")
    assert leftovers(tmp_path) == [PART, SIDECAR] and (tmp_path / PART).stat().st_size == len(body) // 2
    assert get(toy, tmp_path / "toy.h5ad").read_bytes() == body
    assert server.state.log[1].range == f"bytes={len(body) // 2}-" and server.state.body_bytes == len(body)


def test_ctrl_c_keeps_the_part_and_the_rerun_resumes(toy, server, tmp_path, h5ad_bytes, monkeypatch):
    class InterruptingBar:
        def __init__(self, **kw):
            self.updates = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.updates += 1
            if self.updates == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(download, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(download, "progress_bar", InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        get(toy, tmp_path / "toy.h5ad")
    assert leftovers(tmp_path) == [PART, SIDECAR] and (tmp_path / PART).read_bytes() == h5ad_bytes[:2048]
    monkeypatch.undo()
    assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert server.state.log[1].range == "bytes=2048-" and leftovers(tmp_path) == ["toy.h5ad"]


def test_server_ignoring_range_restarts_from_zero(toy, server, tmp_path, h5ad_bytes, caplog):
    server.state.cuts = [1000]
    failure(toy, tmp_path / "toy.h5ad")
    server.state.ranges = False
    with caplog.at_level("INFO", logger="scpretrain.download"):
        assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert server.state.log[1].range == "bytes=1000-" and server.state.log[1].status == 200
    assert "the server sent the whole file" in caplog.text and leftovers(tmp_path) == ["toy.h5ad"]


def test_changed_etag_restarts_with_the_new_file(toy, server, tmp_path, h5ad_bytes, other_h5ad_bytes, caplog):
    server.state.etag, server.state.cuts = '"v1"', [1000]
    failure(toy, tmp_path / "toy.h5ad")
    assert json.loads((tmp_path / SIDECAR).read_text())["etag"] == '"v1"'
    server.state.etag, server.state.files["/toy/toy.h5ad"] = '"v2"', other_h5ad_bytes  # the file changed
    with caplog.at_level("INFO", logger="scpretrain.download"):
        assert get(toy, tmp_path / "toy.h5ad").read_bytes() == other_h5ad_bytes
    second = server.state.log[1]
    assert (second.range, second.if_range, second.status) == ("bytes=1000-", '"v1"', 200)
    assert "starting again from zero" in caplog.text


def test_same_etag_resumes(toy, server, tmp_path, h5ad_bytes):
    server.state.etag, server.state.cuts = '"v1"', [1000]
    failure(toy, tmp_path / "toy.h5ad")
    assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert (server.state.log[1].if_range, server.state.log[1].status) == ('"v1"', 206)


def write_part(folder, content: bytes, sidecar: dict | str | None):
    """What an earlier download left: the part and its sidecar (a dict as JSON, a str as it is, None: none)."""
    (folder / PART).write_bytes(content)
    if sidecar is not None:
        (folder / SIDECAR).write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))


@pytest.mark.parametrize("meta, why", [
    ({"url": "http://elsewhere/toy.h5ad", "total": None}, "it was downloaded from http://elsewhere/toy.h5ad"),
    (None, "says where it came from"),
    ("{truncated", "says where it came from"),
])
def test_part_of_unknown_origin_is_discarded(toy, server, tmp_path, h5ad_bytes, caplog, meta, why):
    write_part(tmp_path, b"\x89HDF\r\n\x1a\n" + b"x" * 100, meta)
    with caplog.at_level("INFO", logger="scpretrain.download"):
        assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert [s.range for s in server.state.log] == [None]  # no Range asked for a part of unknown origin
    assert f"discarding {PART} (108 bytes)" in caplog.text and why in caplog.text
    assert leftovers(tmp_path) == ["toy.h5ad"]


def test_unsatisfiable_range_restarts_once(toy, server, tmp_path, h5ad_bytes, caplog):
    """A part longer than the server's file (it changed, no validator): 416, then the whole file."""
    write_part(tmp_path, h5ad_bytes + b"more", {"url": toy.format(name="toy"), "total": None})
    with caplog.at_level("INFO", logger="scpretrain.download"):
        assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert [(s.range, s.status) for s in server.state.log] == [(f"bytes={len(h5ad_bytes) + 4}-", 416), (None, 200)]
    assert "cannot continue from byte" in caplog.text


def test_mismatching_content_range_restarts_once(toy, server, tmp_path, h5ad_bytes):
    server.state.cuts = [1000]
    failure(toy, tmp_path / "toy.h5ad")
    server.state.content_range_shift = 1
    assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert [(s.range, s.status) for s in server.state.log][1:] == [("bytes=1000-", 206), (None, 200)]


def test_part_larger_than_the_announced_total_is_discarded(toy, server, tmp_path, h5ad_bytes):
    write_part(tmp_path, bytes(5000), {"url": toy.format(name="toy"), "total": 4000})
    assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert [s.range for s in server.state.log] == [None]


def test_second_process_waits_for_the_first(toy, server, tmp_path, h5ad_bytes, caplog):
    """Two downloads of one file at once (torchrun ranks): the second waits for the first's lock
    and takes its file; one request in all."""
    server.state.delay = 1.0
    dest, results = tmp_path / "toy.h5ad", []
    first = threading.Thread(target=lambda: results.append(get(toy, dest)))
    with caplog.at_level("INFO", logger="scpretrain.download"):
        first.start()
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while not server.state.log and time.monotonic() < deadline:
            time.sleep(0.01)
        results.append(get(toy, dest))
        first.join(SERVER_TIMEOUT_S)
    assert results == [dest, dest] and dest.read_bytes() == h5ad_bytes and len(server.state.log) == 1
    assert "waiting for another process downloading .toy.h5ad.part" in caplog.text
    assert leftovers(tmp_path) == ["toy.h5ad"]


# --------------------------------------------------------------------------- failures


def test_download_404_leaves_nothing(server, tmp_path):
    message = failure(server.template(), tmp_path / "toy.h5ad")
    assert "HTTP 404 Not Found" in message and "Check the dataset name and --url_template" in message
    assert f"or place toy.h5ad in {tmp_path} by hand" in message
    assert leftovers(tmp_path) == []


def test_404_discards_an_earlier_part(toy, server, tmp_path):
    server.state.cuts = [1000]
    failure(toy, tmp_path / "toy.h5ad")
    del server.state.files["/toy/toy.h5ad"]
    failure(toy, tmp_path / "toy.h5ad")
    assert leftovers(tmp_path) == []


def test_server_error_keeps_the_part(toy, server, tmp_path, h5ad_bytes):
    """A 503 may pass: the part of an earlier try is kept, and a later call resumes it."""
    server.state.cuts = [1000]
    failure(toy, tmp_path / "toy.h5ad")
    server.state.statuses = [503]
    message = failure(toy, tmp_path / "toy.h5ad")
    assert "HTTP 503" in message and "resumes from the 1,000 bytes" in message
    assert leftovers(tmp_path) == [PART, SIDECAR]
    assert get(toy, tmp_path / "toy.h5ad").read_bytes() == h5ad_bytes
    assert [(s.range, s.status) for s in server.state.log] == [(None, 200), ("bytes=1000-", 503), ("bytes=1000-", 206)]


def test_html_body_is_refused_and_removed(server, tmp_path):
    server.state.files["/toy/toy.h5ad"] = b"<html>not here</html>\n" * 10
    message = failure(server.template(), tmp_path / "toy.h5ad")
    assert "did not send an HDF5 file" in message and "b'<html>no" in message
    assert "points at the dataset file itself" in message
    assert leftovers(tmp_path) == []


def test_wrong_total_size_is_refused_and_removed(toy, server, tmp_path):
    server.state.cuts = [1000]
    failure(toy, tmp_path / "toy.h5ad")
    server.state.extra = b"junk past the end"
    assert "the server announced" in failure(toy, tmp_path / "toy.h5ad")
    assert leftovers(tmp_path) == []


def test_unreachable_fails_fast(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there
    template = f"http://127.0.0.1:{port}/{{name}}.h5ad"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        download.download_dataset("toy", tmp_path / "toy.h5ad", template, timeout=2.0)
    assert time.monotonic() - start < 3.0
    assert "'toy'" in str(err.value) and template.format(name="toy") in str(err.value)
    assert "Check the network" in str(err.value) and leftovers(tmp_path) == []


def test_folder_that_cannot_be_made_is_one_error(toy, server, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    message = failure(toy, tmp_path / "file" / "toy.h5ad")
    assert f"cannot write in {tmp_path / 'file'}" in message and "--dataset_dir" in message
    assert server.state.log == []


def test_bad_url_template_is_one_error(tmp_path):
    with pytest.raises(DataError, match=r"'toy'.*\{name\}"):
        download.download_dataset("toy", tmp_path / "toy.h5ad", "http://x/{nmae}.h5ad")


FAILURES = {  # how the server fails: change its state
    "404": lambda st: st.files.clear(),
    "html": lambda st: st.files.update({"/toy/toy.h5ad": b"<html>oops</html>"}),
    "truncated": lambda st: st.cuts.append(1000),
}


@pytest.mark.parametrize("how", list(FAILURES))
def test_failed_download_never_touches_a_complete_dest(toy, server, tmp_path, how):
    dest = tmp_path / "toy.h5ad"
    dest.write_bytes(b"a complete dataset the user already has")
    FAILURES[how](server.state)
    failure(toy, dest)
    assert dest.read_bytes() == b"a complete dataset the user already has"


@pytest.mark.parametrize("route", ["ok", "missing"])
def test_stale_temporaries_of_the_old_download_code_are_removed(toy, server, tmp_path, route, caplog):
    """The earlier code left .NAME.h5.XXXX.part when killed; a download of NAME removes them,
    whether or not it succeeds, and leaves other datasets' files alone."""
    stale = [tmp_path / ".toy.h5.abc123.part", tmp_path / ".toy.h5ad.zz_9.part"]
    other = tmp_path / ".toy2.h5.abc123.part"
    for p in (*stale, other):
        p.write_bytes(b"half a file")
    if route == "missing":
        server.state.files.clear()
    with caplog.at_level("INFO", logger="scpretrain.download"):
        try:
            get(toy, tmp_path / "toy.h5ad")
        except DataError:
            assert route == "missing"
    assert leftovers(tmp_path) == sorted([other.name] + (["toy.h5ad"] if route == "ok" else []))
    assert "removed .toy.h5.abc123.part, left by an interrupted download" in caplog.text


# --------------------------------------------------------------------------- main.py end to end


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    """A tiny h5ad for every dataset of the paper's collection: 40 cells, 24 of 30 shared genes
    (real human symbols, or their mouse orthologs for mouse datasets)."""
    table = data.read_collection_table()
    human, mouse = orthologous_genes(30)
    folder, files = tmp_path_factory.mktemp("paper"), {}
    for i, (name, row) in enumerate(table.iterrows()):
        keep = np.sort(np.random.default_rng(i).choice(30, 24, replace=False))
        genes = [(mouse if row["species"] == "mouse" else human)[k] for k in keep]
        path = write_cellblast_h5ad(folder / f"{name}.h5ad", 40, genes, labelled=row["labelled"] == "yes", seed=i)
        files[f"/{name}/{name}.h5ad"] = path.read_bytes()
    return files


def run_main(server, dataset_dir, datasets, save_model, extra=()):
    cmd = [sys.executable, "main.py", "--is_pretrain", "--kmeans", "--datasets", *datasets,
           "--url_template", server.template(), "--dataset_dir", str(dataset_dir), "--pt_epoch", "1",
           "--save_model", str(save_model), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_paper_collection_end_to_end(server, tmp_path, paper_files):
    from checkpoints import load as load_checkpoint

    server.state.files.update(paper_files)
    names = list(data.read_collection_table().index)
    start = time.monotonic()
    out = run_main(server, tmp_path / "ds", ["paper"], tmp_path / "p.pt")
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(names) == 66 and sorted(s.path for s in server.state.log) == sorted(paper_files)  # each once
    assert all(s.status == 200 for s in server.state.log)
    assert leftovers(tmp_path / "ds") == sorted(f"{n}.h5ad" for n in names)
    assert load_checkpoint(tmp_path / "p.pt")["datasets"] == names
    print(f"--datasets paper end to end: {seconds:.1f} s")


def test_failed_download_in_the_middle_stops_before_kmeans(server, tmp_path, paper_files):
    names = ["Baron_human", "Muraro", "Enge", "Xin", "Segerstolpe"]
    for n in ("Baron_human", "Muraro", "Xin", "Segerstolpe"):
        server.state.files[f"/{n}/{n}.h5ad"] = paper_files.get(f"/{n}/{n}.h5ad") or paper_files["/Muraro/Muraro.h5ad"]
    out = run_main(server, tmp_path / "ds", names, tmp_path / "p.pt")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "'Enge'" in errors[0] and server.template().format(name="Enge") in errors[0]
    assert "Traceback" not in out.stderr and "K-means" not in out.stderr
    assert [s.path.split("/")[1] for s in server.state.log] == ["Baron_human", "Muraro", "Enge"]
    assert leftovers(tmp_path / "ds") == ["Baron_human.h5ad", "Muraro.h5ad"]
    assert not (tmp_path / "p.pt").exists()
