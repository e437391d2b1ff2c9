"""The coverage-guided fuzzer (tools/fuzz.py): a short run, its harness on the seeds, and what it found.

A long run and its results are in docs/RELIABILITY.md ("Coverage-guided fuzzing").
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

from memtools import ROOT, tool
from stn_edge.device import Runtime
from stn_edge.device.remote import HttpSource
from stn_edge.errors import ArtifactError

fuzz = tool("fuzz")
GOLDEN = ROOT / "tests" / "golden" / "tiny-v1.stn"
CORPUS = ROOT / "tests" / "corpus"
#: seconds of the short run; the seeds alone take a few
SHORT_RUN_SECONDS = 40


@pytest.mark.slow
def test_short_fuzz_run_finds_nothing(tmp_path):
    """8-20k executions, depending on the load (atheris when installed, else random mutations), over the golden file
    and the hostile corpus, every target; a finding exits non-zero and leaves a crash-* file."""
    cmd = [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--seconds", str(SHORT_RUN_SECONDS), "--no-bake",
           "--work", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SHORT_RUN_SECONDS + 240)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    assert res.returncode == 0 and not crashes, (crashes, res.stdout[-3000:] + res.stderr[-6000:])
    assert "Done " in res.stdout + res.stderr


@pytest.mark.slow
def test_random_driver_runs_where_atheris_is_not_installed(tmp_path):
    """The fallback: mutations without coverage feedback, same harness, same exit codes."""
    cmd = [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--driver", "random", "--runs", "3000", "--no-bake",
           "--work", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Done 3000 runs" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    seeds = fuzz.load_seeds([], bake=False, work=tmp_path_factory.mktemp("fuzz"))
    h = fuzz.Harness(seeds, tmp_path_factory.mktemp("scratch"))
    yield h
    h.close()


def test_harness_holds_on_every_golden_seed_input(harness):
    """Every target, budget, hash fix and server misbehaviour of the seed inputs, deterministically
    (this is what the fuzzer starts from, so it runs even where atheris is not installed)."""
    inputs = fuzz.seed_inputs({"golden": GOLDEN.read_bytes()})
    for name, data in inputs.items():
        harness(data)  # raises fuzz.Finding or an untyped exception on a broken promise


def test_harness_catches_a_silently_changed_output(harness, monkeypatch):
    """The oracle works: a runtime that returns other numbers for a seed's header is a finding."""
    data = bytes([1 | 1 << 3, 0, 0, 0, 0]) + GOLDEN.read_bytes()  # runtime target, 50% then 100%, hash not fixed
    harness(data)  # records the seed's outcome
    monkeypatch.setattr(Runtime, "verify", lambda self: {"y": 0.5})
    with pytest.raises(fuzz.Finding, match="seed gives"):
        harness(data)


@pytest.mark.parametrize("behaviour, message", [
    (bytes([0, 8]), "answered 200 to a range request"),
    (bytes([0, 9]), "the server sent 'bytes"),
    (bytes([0, 0x0B]), "connection was cut"),  # Content-Length 1 byte short of the body
    (bytes([0, 0x8C]), "connection was cut"),  # half the body, honest Content-Length
    (bytes([0, 0] + [0x0D] * 9), "SHA-256"),  # a flipped byte in every data range (once is healed by a re-read)
    (bytes([0, 0x0D]), "header checksum"),  # ... in the header's rest
    (bytes([0, 0x0E]), "without a usable Content-Range"),
    (bytes([0, 0x0F]), "HTTP 404"),
    (bytes([0, 0x5A]), "changed on the server"),  # the file grows after the first request
])
def test_fake_server_misbehaviours_are_refused(behaviour, message):
    """The in-process server speaks real HTTP to urllib/http.client: each lie ends in its ArtifactError.
    (A server that promises more bytes than it sends after a complete range, or that grows the file
    from the first request on, is not lying about the bytes read: those loads succeed.)"""
    art = GOLDEN.read_bytes()
    with fuzz.fake_http(fuzz.FakeServer(art, behaviour)):
        with pytest.raises(ArtifactError, match=message):
            with Runtime.load(HttpSource(fuzz.URL, retries=0, workers=1), backend="numpy") as rt:
                rt.verify()


class _LoopbackServer:
    """A real socket on 127.0.0.1 that answers every connection with ``FakeServer.respond`` and closes it."""

    def __init__(self, server):
        self.fake = server
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/model.stn"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # shut down by stop()
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                try:
                    conn.sendall(self.fake.respond(request))
                except OSError:
                    pass  # the client hung up first

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not, on Linux)
        self.sock.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("behaviour", [b"", bytes([0, 0x0B]), bytes([0, 0x1B]), bytes([0, 0x8C]), bytes([0, 0x09]),
                                       bytes([0, 0x0E]), bytes([0, 0x0F]), bytes([0, 0x5A])])
def test_fake_socket_and_real_socket_give_one_outcome(behaviour, monkeypatch):
    """The fuzzer's in-process socket behaves as a real one: the same replies over 127.0.0.1 end the
    same way (lying Content-Length included, where a real socket sees the peer close)."""
    from stn_edge.device import remote

    art = GOLDEN.read_bytes()

    def outcome(url: str) -> str:
        try:
            with Runtime.load(HttpSource(url, retries=0, workers=1, timeout=10), backend="numpy") as rt:
                return repr(rt.verify())
        except ArtifactError as exc:
            return f"{type(exc).__name__}: {str(exc).replace(url, 'URL')}"

    with fuzz.fake_http(fuzz.FakeServer(art, behaviour)):
        fake = outcome(fuzz.URL)
    monkeypatch.setattr(remote, "HEAD_BYTES", 256)  # the head fake_http asks for
    loop = _LoopbackServer(fuzz.FakeServer(art, behaviour))
    try:
        real = outcome(loop.url)
    finally:
        loop.stop()
    assert real == fake


def test_honest_fake_server_loads_what_a_local_load_does():
    art = GOLDEN.read_bytes()
    with Runtime.load(art, mem_limit="50%", backend="numpy") as rt:
        want = rt.verify()
    with fuzz.fake_http(fuzz.FakeServer(art)) as server:
        with Runtime.load(HttpSource(fuzz.URL), mem_limit="50%", backend="numpy") as rt:
            assert rt.verify() == want
    assert server.requests >= 2  # the head, then data ranges


def test_huge_declared_array_over_http_is_refused_before_it_is_allocated():
    """tests/corpus/calibration-1tib.stn served by a server that claims 1 TiB more bytes than it has:
    the header is valid against the claimed size, so the sizes it declares are bounded only by the
    claim. The reader must see the bytes arrive before it allocates the array (found by reasoning
    about the remote target while writing tools/fuzz.py: before the fix, np.empty(1 TiB) raised
    MemoryError from Runtime.verify)."""
    art = (CORPUS / "calibration-1tib.stn").read_bytes()
    server = fuzz.FakeServer(art, bytes([10 | 10 << 4]))  # from the first request on: 2**40 more bytes
    tracemalloc.start()
    try:
        with fuzz.fake_http(server):
            source = HttpSource(fuzz.URL, retries=0, workers=1)
            assert source.size == len(art) + (1 << 40)
            with Runtime.load(source, backend="numpy") as rt:  # the weights are small and honest
                with pytest.raises(ArtifactError, match="connection was cut"):
                    rt.verify()  # reads the 1 TiB calibration output
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # what the server sent (1 MiB of zeros), not what the header declared


def test_fuzz_replays_a_saved_input(tmp_path, harness):
    """`tools/fuzz.py --replay FILE` runs one input: how a finding is reproduced."""
    path = tmp_path / "case"
    path.write_bytes(bytes([0, 0, 0, 0, 0]) + GOLDEN.read_bytes())
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz.py"), "--replay", str(path), "--no-bake", "--work",
                          str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "no finding" in res.stdout, res.stdout + res.stderr
