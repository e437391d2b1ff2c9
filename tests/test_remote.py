"""Loading artifacts over HTTP range requests, against a local server on 127.0.0.1."""
from __future__ import annotations

import contextlib
import http.server
import re
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from stn_edge.device import Runtime
from stn_edge.device.remote import HEAD_BYTES, HttpSource, clear_cache
from stn_edge.errors import ArtifactError

torch = pytest.importorskip("torch")
from stn_edge.host import bake  # noqa: E402  (needs torch)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10),
    )
    path = tmp_path_factory.mktemp("remote") / "mlp.stn"
    bake(model, torch.randn(2, 64), path, calibration=torch.randn(16, 64), importance="spectral", progress=False)
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.data``; ``server.mode`` picks a behaviour; counts body bytes in ``server.served``.

    Every request is counted in ``server.active`` while it is handled, so that a test can wait for the
    server to be done (``Server.idle``) before it reads the counts: a client has its bytes as soon as
    the handler wrote them, before the handler thread counts them, and a reply the client refused can
    still be written after the client moved on.
    """

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.done:
            self.server.active += 1
            self.server.requests += 1
        try:
            self._reply()
        finally:
            with self.server.done:
                self.server.active -= 1
                self.server.done.notify_all()

    def _reply(self) -> None:
        srv = self.server
        data, mode = srv.data, srv.mode
        if mode == "404":
            self.send_error(404)
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if mode == "no-range" or m is None or (if_range is not None and if_range != srv.etag):
            self._send(200, data, {})
            return
        start, stop = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
        body = data[start : stop + 1]
        total = len(data)
        if mode == "corrupt" and start > 0:
            body = bytes(b ^ 0xFF for b in body)
        if mode == "changed" and start > 0:
            total += 1
        if mode == "wrong-range" and start > 0:
            start += 1
        headers = {"Content-Range": f"bytes {start}-{start + len(body) - 1}/{total}"}
        if mode == "cut" and start > 0:  # promise the whole range, send half, hang up
            self._send(206, body[: len(body) // 2], headers, length=len(body))
            return
        self._send(206, body, headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str], length: int | None = None) -> None:
        self.send_response(status)
        if self.server.etag:
            headers = {**headers, "ETag": self.server.etag}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
            with self.server.done:
                self.server.served += len(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (a full download answered from the cache)


class Server:
    def __init__(self, data: bytes):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.data, self.httpd.mode, self.httpd.served, self.httpd.requests = data, "range", 0, 0
        self.httpd.etag = None
        self.httpd.active, self.httpd.done = 0, threading.Condition()
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.stn"

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Hold the server's lock once no request is being handled (every reply written and counted).

        A client has received a reply before its handler finishes, so every request a test made has
        started; waiting for none to be active is waiting for the counts to be final.
        """
        with self.httpd.done:
            if not self.httpd.done.wait_for(lambda: self.httpd.active == 0, timeout=60):
                raise AssertionError("the test server is still handling a request after 60 s")
            yield

    def reset(self, mode: str = "range") -> None:
        with self.idle():  # a late reply to the previous load must not count in the next one
            self.httpd.mode, self.httpd.served, self.httpd.requests = mode, 0, 0

    @property
    def served(self) -> int:
        with self.idle():
            return self.httpd.served

    @property
    def requests(self) -> int:
        with self.idle():
            return self.httpd.requests

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def server(artifact):
    srv = Server(artifact.read_bytes())
    yield srv
    srv.stop()


def _x(rt: Runtime) -> dict[str, np.ndarray]:
    return {rt.input_names[0]: np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}


def _planned(rt: Runtime) -> int:
    """Bytes of data a fresh load at the runtime's plan reads: dense tensors plus each layer's choice."""
    return rt.plan.total_bytes


def test_remote_load_fetches_header_and_planned_ranges(server, artifact):
    with Runtime.load(artifact, mem_limit="50%", backend="numpy") as local:
        want = local.run(_x(local))
    with Runtime.load(server.url, mem_limit="50%", backend="numpy") as rt:
        np.testing.assert_array_equal(rt.run(_x(rt))[rt.output_names[0]], want[rt.output_names[0]])
        planned = _planned(rt)
        # the first 64 KiB hold the header; then the planned blocks, coalesced over gaps of < 64 KiB
        assert planned <= server.served <= HEAD_BYTES + planned + 64 * 1024 * (server.requests - 1)
        blocks = sum(1 + 2 * (not c.dense) for c in rt.plan.layers)
        assert server.requests <= 1 + blocks  # coalesced: never more than one request per planned array
        assert rt.verify()[rt.output_names[0]] < 1.0


def test_remote_rescale_up_fetches_only_missing_rows(server):
    with Runtime.load(server.url, mem_limit="25%", backend="numpy") as rt:
        for budget in ("60%", "30%", "100%"):
            before, read_before, requests = server.served, rt.bytes_read, server.requests
            rt.rescale(budget)
            fetched, needed = server.served - before, rt.bytes_read - read_before
            # the reader reads only the missing rows (tests/test_end_to_end.py counts them exactly);
            # over HTTP they cost at most one gap of < 64 KiB per request on top
            assert fetched <= needed + 64 * 1024 * (server.requests - requests)


def test_cache_serves_second_load_and_heals_corruption(server, tmp_path):
    cache = tmp_path / "cache"
    with Runtime.load(server.url, mem_limit="50%", backend="numpy", cache_dir=cache) as rt:
        want = rt.run(_x(rt))
    files = sorted(cache.rglob("*"))
    assert files and not [p for p in files if p.name.endswith(".tmp")]
    server.reset()
    with Runtime.load(server.url, mem_limit="50%", backend="numpy", cache_dir=cache) as rt:
        assert server.served <= HEAD_BYTES and server.requests == 1  # only the header, to check the cache
        np.testing.assert_array_equal(rt.run(_x(rt))[rt.output_names[0]], want[rt.output_names[0]])
    # flip a byte in every cached range: the block hashes catch it, the ranges are fetched again
    for path in cache.rglob("*.bin"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    server.reset()
    with Runtime.load(server.url, mem_limit="50%", backend="numpy", cache_dir=cache) as rt:
        np.testing.assert_array_equal(rt.run(_x(rt))[rt.output_names[0]], want[rt.output_names[0]])
        assert server.requests > 1
    clear_cache(cache)
    assert not list(cache.iterdir())


def test_server_without_range_support_is_a_clear_error_or_a_full_download(server, artifact, tmp_path):
    server.reset("no-range")
    with pytest.raises(ArtifactError, match="ignores HTTP range requests.*full_download=True"):
        Runtime.load(server.url, mem_limit="50%", backend="numpy")
    size = artifact.stat().st_size
    server.reset("no-range")
    with Runtime.load(HttpSource(server.url, full_download=True), mem_limit="50%", backend="numpy") as rt:
        assert rt.run(_x(rt))
        assert server.served == size
    cache = tmp_path / "cache"
    for _ in range(2):  # the second load finds the whole artifact in the cache
        with Runtime.load(HttpSource(server.url, full_download=True, cache_dir=cache), mem_limit="50%",
                          backend="numpy") as rt:
            assert rt.run(_x(rt))
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["artifact.stn"]


@pytest.mark.parametrize(
    "mode, message",
    [
        ("corrupt", "SHA-256"),
        ("changed", "changed on the server"),
        ("wrong-range", "the server sent"),
        ("cut", "connection was cut|cannot fetch"),
        ("404", "HTTP 404"),
    ],
)
def test_misbehaving_servers_are_refused(server, mode, message):
    server.reset(mode)
    with pytest.raises(ArtifactError, match=message):
        Runtime.load(HttpSource(server.url, retries=0, timeout=5), mem_limit="50%", backend="numpy")


def test_artifact_replaced_between_requests_is_caught_by_if_range(server):
    server.httpd.etag = '"v1"'
    source = HttpSource(server.url, retries=0)  # the head, with ETag "v1"
    server.httpd.etag = '"v2"'  # the file is replaced: If-Range "v1" no longer matches, the server sends it all
    with pytest.raises(ArtifactError, match="stopped honouring ranges or the artifact changed"):
        Runtime.load(source, mem_limit="50%", backend="numpy")


def test_unreachable_server_is_an_artifact_error():
    probe = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens there now
    with pytest.raises(ArtifactError, match="cannot fetch"):
        HttpSource(f"http://127.0.0.1:{port}/m.stn", retries=1, timeout=2)


def test_hostile_artifact_over_http_is_refused(server):
    server.httpd.data = b"\x89STN\r\n\x1a\n" + b"\xff" * 100
    with pytest.raises(ArtifactError):
        Runtime.load(server.url, backend="numpy")
