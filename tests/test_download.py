"""data.download_dataset / resolve_dataset_path against a local HTTP server: success and every failure."""
import http.server
import os
import socket
import stat
import threading
import time

import h5py
import numpy as np
import pytest

import data
from data import DataError
from helpers import toy_dataset_file

SERVER_TIMEOUT_S = 5  # no request handler or client read may block longer than this


@pytest.fixture(scope="module")
def h5_bytes(tmp_path_factory):
    """The bytes of a small valid Cell BLAST .h5."""
    path = toy_dataset_file(tmp_path_factory.mktemp("src") / "toy.h5", n_cells=20, n_genes=10)
    return path.read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /ok/NAME.h5 (valid file), /truncated/... (Content-Length larger than the body, then
    close), /big_truncated/... (the same past the client's first 1 MiB read), /chunked_truncated/...
    (chunked transfer cut before its last chunk), /text/... (not HDF5), anything else 404.
    Counts requests per path."""

    timeout = SERVER_TIMEOUT_S  # a stuck client cannot hold a handler forever
    body = b""
    hits: dict = {}

    def do_GET(self):
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        route = self.path.split("/")[1]
        if route == "ok":
            self._send(self.body, len(self.body))
        elif route == "truncated":
            self._send(self.body[: len(self.body) // 2], len(self.body))
            self.close_connection = True
        elif route == "big_truncated":
            big = self.body + bytes(3 << 20)
            self._send(big[: len(big) // 2], len(big))
            self.close_connection = True
        elif route == "chunked_truncated":
            self._send_chunked_truncated()
        elif route == "text":
            self._send(b"<html>not here</html>\n" * 10, None)
        else:
            self.send_error(404, "Not Found")

    def _send(self, payload, content_length):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(content_length if content_length is not None else len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _send_chunked_truncated(self):
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        half = self.body[: len(self.body) // 2]
        self.wfile.write(b"%x\r\n%s\r\n" % (len(half), half))  # then close: no terminating 0-chunk
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(h5_bytes):
    """Base URL of a server on 127.0.0.1 (port 0) in a daemon thread, shut down after the test."""
    Handler.body, Handler.hits = h5_bytes, {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.timeout = SERVER_TIMEOUT_S
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()  # ends serve_forever within one poll interval
        httpd.server_close()
        thread.join(timeout=SERVER_TIMEOUT_S)
        assert not thread.is_alive()


def leftovers(folder):
    """Files a failed or finished download might leave behind (temporary *.part included)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_success(server, tmp_path, h5_bytes):
    dest = tmp_path / "dl" / "toy.h5"
    assert data.download_dataset("toy", dest, server + "/ok/{name}.h5", timeout=SERVER_TIMEOUT_S) == dest
    assert dest.read_bytes() == h5_bytes
    with h5py.File(dest, "r") as h5:
        assert "exprs" in h5
    assert data.read_cellblast_h5(dest).n_cells == 20
    assert leftovers(dest.parent) == ["toy.h5"]  # no *.part left


def test_downloaded_file_has_normal_permissions(server, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    dest = data.download_dataset("toy", tmp_path / "toy.h5", server + "/ok/{name}.h5", timeout=SERVER_TIMEOUT_S)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask


def test_download_404_names_dataset_and_url(server, tmp_path):
    dest = tmp_path / "toy.h5"
    url = server + "/missing/toy.h5"
    with pytest.raises(DataError) as err:
        data.download_dataset("toy", dest, server + "/missing/{name}.h5", timeout=SERVER_TIMEOUT_S)
    assert "'toy'" in str(err.value) and url in str(err.value) and "Not Found" in str(err.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("route", ["truncated", "big_truncated", "chunked_truncated"])
def test_download_truncated_body_leaves_nothing(server, tmp_path, route):
    with pytest.raises(DataError) as err:
        data.download_dataset("toy", tmp_path / "toy.h5", server + f"/{route}/{{name}}.h5", timeout=SERVER_TIMEOUT_S)
    assert "'toy'" in str(err.value) and server + f"/{route}/toy.h5" in str(err.value)
    assert leftovers(tmp_path) == []


def test_download_non_hdf5_body_is_refused(server, tmp_path):
    with pytest.raises(DataError, match="HDF5") as err:
        data.download_dataset("toy", tmp_path / "toy.h5", server + "/text/{name}.h5", timeout=SERVER_TIMEOUT_S)
    assert server + "/text/toy.h5" in str(err.value)
    assert leftovers(tmp_path) == []


def test_download_file_url(tmp_path, h5_bytes):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "toy.h5").write_bytes(h5_bytes)
    dest = tmp_path / "dl" / "toy.h5"
    data.download_dataset("toy", dest, f"file://{src}/{{name}}.h5")
    assert dest.read_bytes() == h5_bytes and leftovers(dest.parent) == ["toy.h5"]


def test_download_missing_file_url(tmp_path):
    with pytest.raises(DataError, match="toy"):
        data.download_dataset("toy", tmp_path / "dl" / "toy.h5", f"file://{tmp_path}/nowhere/{{name}}.h5")
    assert leftovers(tmp_path / "dl") == []


def closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_unreachable_fails_fast(tmp_path):
    url_template = f"http://127.0.0.1:{closed_port()}/{{name}}.h5"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        data.download_dataset("toy", tmp_path / "toy.h5", url_template, timeout=2.0)
    assert time.monotonic() - start < 3.0
    assert url_template.format(name="toy") in str(err.value)
    assert leftovers(tmp_path) == []


def test_resolve_downloads_once_then_uses_local_file(server, tmp_path, h5_bytes):
    dataset_dir = tmp_path / "dataset"
    template = server + "/ok/{name}.h5"
    path = data.resolve_dataset_path("toy", dataset_dir, template, timeout=SERVER_TIMEOUT_S)
    assert path == dataset_dir / "toy.h5" and path.read_bytes() == h5_bytes
    assert data.resolve_dataset_path("toy", dataset_dir, template, timeout=SERVER_TIMEOUT_S) == path
    assert Handler.hits == {"/ok/toy.h5": 1}


def test_resolve_failure_names_dataset_and_url(server, tmp_path):
    with pytest.raises(DataError) as err:
        data.resolve_dataset_path("Baron_human", tmp_path, server + "/missing/{name}.h5", timeout=SERVER_TIMEOUT_S)
    assert "Baron_human" in str(err.value) and server + "/missing/Baron_human.h5" in str(err.value)
    assert leftovers(tmp_path) == []


def test_resolve_explicit_paths(tmp_path):
    local = toy_dataset_file(tmp_path / "mine.h5", n_cells=5, n_genes=4)
    assert data.resolve_dataset_path(str(local), tmp_path / "unused") == local
    with pytest.raises(DataError, match="not found"):
        data.resolve_dataset_path(str(tmp_path / "absent.h5"), tmp_path / "unused")
    assert not (tmp_path / "unused").exists()  # nothing was downloaded


def test_load_collection_downloads_missing_dataset(server, tmp_path):
    datasets = data.load_collection(["toy"], dataset_dir=tmp_path, url_template=server + "/ok/{name}.h5")
    assert [d.name for d in datasets] == ["toy"] and datasets[0].n_cells == 20
    np.testing.assert_array_equal(datasets[0].genes, [f"GENE{i}" for i in range(10)])


@pytest.mark.parametrize("route", ["ok", "missing"])
def test_partial_files_of_a_killed_download_are_removed(server, tmp_path, route, caplog):
    """A process killed mid-download leaves .NAME.h5.*.part; the next download of NAME removes it,
    whether or not it succeeds, and leaves other datasets' partial files alone."""
    stale = [tmp_path / ".toy.h5.abc123.part", tmp_path / ".toy.h5.zz_9.part"]
    other = tmp_path / ".toy2.h5.abc123.part"
    for p in (*stale, other):
        p.write_bytes(b"half a file")
    with caplog.at_level("INFO", logger="scpretrain.data"):
        try:
            data.download_dataset("toy", tmp_path / "toy.h5", server + f"/{route}/{{name}}.h5",
                                  timeout=SERVER_TIMEOUT_S)
        except DataError:
            assert route == "missing"
    assert leftovers(tmp_path) == sorted([other.name] + (["toy.h5"] if route == "ok" else []))
    assert "removed .toy.h5.abc123.part, left by an interrupted download" in caplog.text
