"""Coverage-guided fuzzing of everything that reads an artifact.

    python tools/fuzz.py --seconds 60                      # atheris (libFuzzer) when installed
    python tools/fuzz.py --runs 1000000 --work out/fuzz    # a long campaign, resumable from out/fuzz/corpus
    python tools/fuzz.py --seconds 36000 --keep-going      # ... that saves findings and goes on
    python tools/fuzz.py --driver random --seconds 60      # random mutations, no coverage feedback
    python tools/fuzz.py --replay crash-1234               # run one input and print what it raised
    python tools/fuzz.py --replay out/fuzz/corpus          # every input of a folder (e.g. under coverage.py)

One fuzz input is ``CASE_BYTES`` bytes that pick what to run, then an artifact::

    byte 0  bits 0-1  target: reader | runtime | cli | remote
            bit  2    recompute the header's SHA-256 so that header edits reach msgpack and the validator
            bits 3-5  the load budget (BUDGETS); the rescale budget is another one
            bit  6    remote: keep a cache_dir and load twice (the second load reads the cache)
            bit  7    remote: full_download=True
    bytes 1-4         remote: how the fake server misbehaves on its first four requests (FakeServer)

Targets and what each must hold (anything else is a finding: the harness raises and the driver
keeps the input as ``crash-*`` under ``--work`` and stops; with ``--keep-going`` as ``finding-*``, and goes on):

- ``reader``: ``ArtifactReader`` opens the bytes and reads every array; only ``ArtifactError``.
- ``runtime``: ``Runtime.load`` at the budget on the numpy backend, ``verify``, ``rescale`` to the
  other budget, ``verify``; only ``STNError``s.
- ``cli``: ``stn-edge verify`` (``stn_edge.cli.main`` in this process) on the bytes written to a
  file; it returns an exit code, raises nothing.
- ``remote``: the runtime flow through ``HttpSource`` over an in-process fake HTTP server (the real
  ``urllib``/``http.client`` stack on a fake socket) that answers wrong ranges, short bodies, lying
  ``Content-Length``, changed sizes, corrupted bytes, garbage ``Content-Range`` and error statuses;
  only ``STNError``s, and a load that succeeds gives what a local load of the same bytes gives.

Silent changes: the header's SHA-256 sits in the preamble, so an input whose hash was not recomputed
and that still opens has a seed's header; whatever its other bytes, the runtime and CLI flows must
then give exactly what that seed gives at the same budgets (or refuse with ``ArtifactError``).

Bounded memory: the address space is capped (``--memory-mb`` over what the process holds at start)
and libFuzzer's RSS limit is set, so a header that makes the reader allocate what the file does not
hold fails as ``MemoryError``, a finding. File descriptors must not leak across cases.

Seeds: ``tests/golden/*.stn`` and ``tests/corpus/*.stn`` (up to 64 KiB), each under every target,
plus four small baked models when torch is installed (``--no-bake`` skips them). Results are in docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import io
import os
import random
import re
import resource
import shutil
import struct
import sys
import time
import traceback
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SEED_DIRS = (ROOT / "tests" / "golden", ROOT / "tests" / "corpus")
CASE_BYTES = 5
TARGETS = ("reader", "runtime", "cli", "remote")
#: load budgets; the rescale budget of budget i is BUDGETS[(5 * i + 3) % 8]
BUDGETS: tuple[Any, ...] = ("100%", "50%", "25%", "10%", None, 4096, "1%", "60%")
URL = "http://fuzz.invalid/model.stn"
#: exit codes `stn-edge verify` may return: ok, failed check / STNError, ArtifactError, BudgetError, BackendError, InputError
CLI_CODES = {0, 1, 3, 4, 5, 6}


class Finding(AssertionError):
    """An input broke a promise: an untyped exception, a silently changed output, a leak."""


# --------------------------------------------------------------------------- the fake HTTP server


class FakeServer:
    """Answers range requests for ``data`` as raw HTTP/1.1 bytes; ``behaviour[i]`` picks how request
    ``i`` misbehaves (requests past the list are honest).

    A behaviour byte is ``kind | arg << 4``: kinds 0-7 are honest; 8 ignores ranges (200, whole
    file); 9 shifts the ``Content-Range`` start by ``arg + 1``; 10 serves a larger file from then on
    (``data`` and ``arg + 1`` zeros, or ``2**(4 arg)`` for ``arg >= 8``; it sends at most 1 MiB of them);
    11 lies in ``Content-Length``: for odd ``arg`` it promises ``17 * arg + 1`` bytes more than the
    body (the connection is then cut), for even ``arg`` ``arg + 1`` bytes fewer; 12 sends ``arg / 16`` of the body with an honest length (``arg == 0``: 7 bytes too
    many); 13 flips the body's byte ``arg``; 14 sends a garbage ``Content-Range`` (``arg`` picks
    which); 15 answers an error status (``arg`` picks which).
    """

    STATUSES = (404, 416, 500, 503, 204, 403, 206, 200)
    BAD_RANGES = ("", "bytes */{total}", "bytes {start}-{stop}/*", "items {start}-{stop}/{total}",
                  "bytes {stop}-{start}/{total}", "bytes {start}-{stop}/{total}/x", "bytes -1-{stop}/{total}",
                  "bytes {start}-{stop}/{start}", "bytes 0-{stop}/{total}", "bytes {start}-{big}/{big}",
                  "bytes {start}-{stop}/00{total}", "bytes  {start} - {stop} / {total}",
                  "bytes {start}-{stop}/{total}, bytes 0-1/{total}", "BYTES {start}-{stop}/{total}",
                  "bytes {start}-{stop}/{total}0", "bytes {start}-{stop}")

    def __init__(self, data: bytes, behaviour: bytes = b""):
        self.data = data
        self.behaviour = behaviour
        self.requests = 0
        self.grown = 0  # bytes of zeros served past ``data``

    def respond(self, request: bytes) -> bytes:
        i, self.requests = self.requests, self.requests + 1
        code = self.behaviour[i] if i < len(self.behaviour) else 0
        kind, arg = code & 15, code >> 4
        if kind == 10:  # from now on, serve a larger file: these bytes, then zeros
            self.grown = arg + 1 if arg < 8 else 1 << 4 * arg
        data, total = self.data, len(self.data) + self.grown
        m = re.search(rb"\r\nRange: bytes=(\d+)-(\d+)\r\n", request, re.IGNORECASE)
        if m is None or kind == 8:
            return self._reply(200, data, {})
        start, stop = int(m.group(1)), int(m.group(2))
        if start >= total:
            return self._reply(416, b"", {"Content-Range": f"bytes */{total}"})
        stop = min(stop, total - 1)
        body = data[start:stop + 1]
        rng = [start, stop, total]
        headers: dict[str, str] = {}
        length = None
        body += bytes(min(stop + 1 - start - len(body), 1 << 20))  # zeros past the data (at most 1 MiB)
        if kind == 9:
            rng[0] += arg + 1
        elif kind == 11:  # a lying Content-Length: more than the body (odd arg) or less
            length = len(body) + 17 * arg + 1 if arg % 2 else max(0, len(body) - 1 - arg)
        elif kind == 12:
            body = body + b"\x00" * 7 if arg == 0 else body[: len(body) * arg // 16]
        elif kind == 13 and body:
            flipped = bytearray(body)
            flipped[arg % len(body)] ^= 0x5A
            body = bytes(flipped)
        elif kind == 14:
            headers["Content-Range"] = self.BAD_RANGES[arg].format(start=start, stop=stop, total=total, big=1 << 50)
        elif kind == 15:
            status = self.STATUSES[arg % len(self.STATUSES)]
            return self._reply(status, body if status in (200, 206) else b"", {})
        headers.setdefault("Content-Range", "bytes {}-{}/{}".format(*rng))
        return self._reply(206, body, headers, length)

    @staticmethod
    def _reply(status: int, body: bytes, headers: dict[str, str], length: int | None = None) -> bytes:
        lines = [f"HTTP/1.1 {status} Fuzz"] + [f"{k}: {v}" for k, v in headers.items() if v]
        lines += [f"Content-Length: {len(body) if length is None else length}", "Connection: close", "", ""]
        return "\r\n".join(lines).encode() + body


class _FakeSocket:
    """What ``http.client`` needs of a socket: it sends the request, then reads the reply from ``makefile``."""

    def __init__(self, server: FakeServer):
        self._server = server
        self._sent = bytearray()

    def sendall(self, data: bytes) -> None:
        self._sent += data

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._server.respond(bytes(self._sent)))

    def settimeout(self, timeout: float | None) -> None:
        pass

    def close(self) -> None:
        pass


class _FakeConnection(http.client.HTTPConnection):
    def __init__(self, server: FakeServer, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._server = server

    def connect(self) -> None:
        self.sock = _FakeSocket(self._server)


class _FakeHandler(urllib.request.HTTPHandler):
    """Sends every ``http://`` request of ``urllib.request.urlopen`` to the current fake server."""

    server: FakeServer | None = None

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        if self.server is None:
            raise urllib.error.URLError("no fake server")
        return self.do_open(functools.partial(_FakeConnection, self.server), req)


@contextlib.contextmanager
def fake_http(server: FakeServer, head_bytes: int = 256):
    """Route ``urllib.request.urlopen`` to ``server`` while the block runs.

    Retries do not sleep, and the first request asks for ``head_bytes`` instead of 64 KiB, so that
    small artifacts are read as large ones are: the header's rest and the blocks by range requests.
    """
    from stn_edge.device import remote

    handler = _FakeHandler()
    handler.server = server
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), handler)
    saved = urllib.request._opener, remote.time, remote.HEAD_BYTES
    urllib.request.install_opener(opener)
    remote.time, remote.HEAD_BYTES = _NoSleep(), head_bytes
    try:
        yield server
    finally:
        urllib.request.install_opener(saved[0])
        remote.time, remote.HEAD_BYTES = saved[1:]


class _NoSleep:
    """Stands in for the ``time`` module in ``remote``: back-off between retries costs nothing here."""

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


# --------------------------------------------------------------------------- the harness


def fix_header_hash(data: bytes) -> bytes:
    """``data`` with the preamble's header SHA-256 recomputed (when the header length fits the file)."""
    if len(data) < 48:
        return data
    hlen = struct.unpack_from("<I", data, 12)[0]
    if 48 + hlen > len(data):
        return data
    return data[:16] + hashlib.sha256(data[48:48 + hlen]).digest() + data[48:]


class Harness:
    """Runs one fuzz input against its target and checks the promises; state shared across inputs."""

    def __init__(self, seeds: dict[str, bytes], scratch: Path):
        from stn_edge.errors import ArtifactError
        from stn_edge.format import ArtifactReader

        self.scratch = scratch  # the CLI's input file and the remote cache live here
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        self.pristine: dict[bytes, bytes] = {}  # header SHA-256 -> a valid seed's bytes
        for data in seeds.values():
            try:
                ArtifactReader(data).close()
            except ArtifactError:
                continue
            self.pristine.setdefault(data[16:48], data)
        self._reference: dict[tuple, Any] = {}
        self._fds = self._fd_count()

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    @staticmethod
    def _fd_count() -> int:
        try:
            return len(os.listdir("/proc/self/fd"))
        except OSError:
            return 0

    def __call__(self, data: bytes) -> None:
        if len(data) < CASE_BYTES:
            return
        ctrl, behaviour, art = data[0], data[1:CASE_BYTES], data[CASE_BYTES:]
        target = TARGETS[ctrl & 3]
        if ctrl & 4:
            art = fix_header_hash(art)
        i = (ctrl >> 3) & 7
        budgets = (BUDGETS[i], BUDGETS[(5 * i + 3) % 8])
        # a seed's header, unchanged: whatever else changed, the flows must give what the seed gives
        seed = self.pristine.get(art[16:48]) if not ctrl & 4 and len(art) >= 48 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if target == "reader":
                self.reader(art)
            elif target == "runtime":
                self.runtime(art, budgets, seed)
            elif target == "cli":
                self.cli(art, budgets[0], seed)
            else:
                self.remote(art, budgets, behaviour, cache=bool(ctrl & 64), full=bool(ctrl & 128))
        fds = self._fd_count()
        if fds > self._fds + 8:
            raise Finding(f"{fds - self._fds} file descriptors leaked ({target})")

    # ------------------------------------------------------------------ targets

    def reader(self, art: bytes) -> None:
        from stn_edge.errors import ArtifactError
        from stn_edge.format import ArtifactReader

        try:
            with ArtifactReader(art) as reader:
                h = reader.header
                refs = list(h["tensors"].values())
                for layer in h["layers"]:
                    refs.append(layer["dense"])
                    refs.extend(layer["factors"].values())
                    if layer.get("corrections") is not None:
                        refs.append(layer["corrections"])
                for group in (h.get("calibration") or {}).values():
                    refs.extend(group.values())
                for ref in refs:
                    if "blocks" in ref:
                        reader.read_rows(ref, 0, len(ref["blocks"]))
                    else:
                        reader.read_array(ref)
        except ArtifactError:
            pass

    def _flow(self, source: Any, budgets: tuple) -> tuple:
        """Load at ``budgets[0]``, verify, rescale to ``budgets[1]``, verify: the outcome, or the typed refusal."""
        from stn_edge.device import Runtime
        from stn_edge.errors import STNError

        try:
            with Runtime.load(source, mem_limit=budgets[0], backend="numpy") as rt:
                first = self._verify(rt)
                rt.rescale(budgets[1])
                return ("ok", first, self._verify(rt), rt.plan.total_bytes)
        except STNError as exc:
            return ("refused", type(exc).__name__)

    @staticmethod
    def _verify(rt: Any) -> Any:
        if not rt.header.get("calibration"):
            return None
        return repr(sorted(rt.verify().items()))  # repr: NaN equals NaN

    def _reference_outcome(self, seed: bytes, key: tuple, make: Callable[[], Any]) -> Any:
        key = (hashlib.sha256(seed).digest(),) + key
        if key not in self._reference:
            self._reference[key] = make()
        return self._reference[key]

    def runtime(self, art: bytes, budgets: tuple, seed: bytes | None) -> None:
        got = self._flow(art, budgets)
        if seed is not None:
            want = self._reference_outcome(seed, ("runtime", budgets), lambda: self._flow(seed, budgets))
            if got != want and got != ("refused", "ArtifactError"):
                raise Finding(f"a seed's header with other bytes gave {got!r}, the seed gives {want!r}")

    def cli(self, art: bytes, budget: Any, seed: bytes | None) -> None:
        code = self._cli_code(art, budget)
        if code not in CLI_CODES:
            raise Finding(f"stn-edge verify returned {code!r}")
        if seed is not None:
            want = self._reference_outcome(seed, ("cli", budget), lambda: self._cli_code(seed, budget))
            if code not in (want, 3):
                raise Finding(f"stn-edge verify gave exit code {code} on a seed's header, the seed gives {want}")

    def _cli_code(self, art: bytes, budget: Any) -> Any:
        from stn_edge import cli

        path = self.scratch / "case.stn"
        path.write_bytes(art)
        argv = ["verify", str(path), "--backend", "numpy"] + ([] if budget is None else ["--mem-limit", str(budget)])
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return cli.main(argv)

    def remote(self, art: bytes, budgets: tuple, behaviour: bytes, cache: bool, full: bool) -> None:
        from stn_edge.device.remote import HttpSource
        from stn_edge.errors import STNError

        local = self._flow(art, budgets)
        cache_dir = self.scratch / "cache" if cache else None
        server = FakeServer(art, behaviour)
        try:
            with fake_http(server):
                for _ in range(2 if cache else 1):
                    try:
                        source = HttpSource(URL, cache_dir=cache_dir, full_download=full, retries=1, timeout=1, workers=1)
                    except STNError:
                        continue
                    got = self._flow(source, budgets)
                    if got[0] == "ok" and got != local:
                        raise Finding(f"over HTTP the load gave {got!r}, a local load of the same bytes {local!r}")
        finally:
            if cache_dir is not None:
                shutil.rmtree(cache_dir, ignore_errors=True)


# --------------------------------------------------------------------------- seeds and drivers


#: larger golden files are left out of the seeds: every input is mutated and run whole, and the four
#: baked seeds hold the same families in 12-23 KB
MAX_SEED_BYTES = 64 * 1024


def load_seeds(extra: list[Path], bake: bool, work: Path) -> dict[str, bytes]:
    """Artifact seeds by name: the golden files and the hostile corpus up to ``MAX_SEED_BYTES`` each,
    ``extra`` files, small baked models."""
    seeds: dict[str, bytes] = {}
    for folder in SEED_DIRS:
        for path in sorted(folder.glob("*.stn")):
            if path.stat().st_size <= MAX_SEED_BYTES:
                seeds[f"{folder.name}-{path.stem}"] = path.read_bytes()
    for path in extra:
        seeds[path.stem] = path.read_bytes()
    if bake:
        seeds.update(baked_seeds(work / "baked"))
    return seeds


def baked_seeds(folder: Path) -> dict[str, bytes]:
    """Four small baked models, cached in ``folder``: an MLP (svd) and a CNN baked with three family
    sets (the search picks cp and tt; tucker2; svd-spatial), with per-level corrections and recorded
    activation shapes (about 12-23 KB each)."""
    specs = {"baked-mlp": ("mlp", {"structure": "svd"}), "baked-cnn-cp-tt": ("cnn", {}),
             "baked-cnn-tucker2": ("cnn", {"structure": ["tucker2", "tr"]}),
             "baked-cnn-spatial": ("cnn", {"structure": ["svd-spatial", "fctn"]})}
    if all((folder / f"{n}.stn").is_file() for n in specs):
        return {n: (folder / f"{n}.stn").read_bytes() for n in specs}
    try:
        import torch

        from stn_edge.host import bake
    except ImportError:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (arch, kw) in specs.items():
        torch.manual_seed(0)
        if arch == "mlp":
            model, shape = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)), (2, 24)
        else:
            model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4))
            shape = (2, 3, 6, 6)
        path = folder / f"{name}.stn"
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bake(model, torch.randn(*shape), path, calibration=torch.randn(4, *shape[1:]), levels=4,
                     importance="spectral", progress=False, min_bytes=512, **kw)
        except Exception as exc:  # the host side is optional here; say so and fuzz without it
            print(f"fuzz: could not bake {name} ({type(exc).__name__}: {exc}); going on without it", file=sys.stderr)
            continue
        out[name] = path.read_bytes()
    return out


def seed_inputs(seeds: dict[str, bytes]) -> dict[str, bytes]:
    """Fuzz inputs from artifact seeds: every seed under every target, budget and hash fix, honest server."""
    inputs = {}
    for name, art in seeds.items():
        for t in range(len(TARGETS)):
            for fix in (0, 4):
                for b in (0, 1, 3):
                    ctrl = t | fix | b << 3
                    inputs[f"{name}-{TARGETS[t]}-{ctrl:02x}"] = bytes([ctrl, 0, 0, 0, 0]) + art
        # the remote target with a cache, a full download, and each misbehaviour on the first range read
        for kind in range(8, 16):
            inputs[f"{name}-remote-k{kind}"] = bytes([3 | 64, 0, kind | 0x30, kind | 0x10, 0]) + art
        inputs[f"{name}-remote-full"] = bytes([3 | 128, 8, 0, 0, 0]) + art
    return inputs


def scratch_dir(work: Path) -> Path:
    """A folder for the CLI's input file and the remote cache: in memory (/dev/shm) where there is one.

    atheris ends the process without running Python's exit handlers, so folders of finished runs
    are removed here, by the next run.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return work / "scratch"
    for old in shm.glob("stn-fuzz-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return shm / f"stn-fuzz-{os.getpid()}"


def limit_memory(extra_mb: int) -> None:
    """Cap the address space at what the process maps now plus ``extra_mb``: big allocations raise MemoryError."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:")) * 1024
    limit = vm + extra_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


class KeepGoing:
    """Wraps the harness for ``--keep-going``: a finding is saved as ``finding-<sha1>`` under ``work`` and
    printed once per kind (exception type and the line that raised it), and the run goes on."""

    def __init__(self, harness: Harness, work: Path):
        self.harness, self.work, self.kinds = harness, work, set()

    def __call__(self, data: bytes) -> None:
        try:
            self.harness(data)
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            kind = (type(exc).__name__, frame.filename, frame.lineno)
            (self.work / f"finding-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
            if kind not in self.kinds:
                self.kinds.add(kind)
                print(f"fuzz: finding {len(self.kinds)}: {type(exc).__name__} at {frame.filename}:{frame.lineno}",
                      file=sys.stderr)
                traceback.print_exc()


def run_atheris(harness: Callable[[bytes], None], inputs: dict[str, bytes], args: argparse.Namespace) -> int:
    import atheris

    seed_dir = args.work / "seeds"
    if seed_dir.exists():
        shutil.rmtree(seed_dir)
    seed_dir.mkdir(parents=True)
    for name, data in inputs.items():
        (seed_dir / name).write_bytes(data)
    corpus = args.work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    flags = [f"-rss_limit_mb={args.rss_limit_mb}", f"-timeout={args.timeout}", f"-artifact_prefix={args.work}/",
             "-print_final_stats=1", f"-max_len={max(len(d) for d in inputs.values()) + 4096}",
             f"-seed={args.seed}", "-reload=0", "-print_pcs=0"]
    if args.seconds:
        flags.append(f"-max_total_time={int(args.seconds)}")
    if args.runs:
        flags.append(f"-runs={args.runs}")
    atheris.Setup([sys.argv[0], *flags, str(corpus), str(seed_dir)], harness)
    atheris.Fuzz()  # exits the process: 0 when time or runs are spent, 1 (or more) on a finding
    return 0


def mutate(data: bytearray, rng: random.Random, seeds: list[bytes]) -> bytearray:
    """1-4 random edits: flips, truncations, insertions, deletions, splices, interesting integers."""
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        pos = rng.randrange(len(data))
        op = rng.randrange(7)
        if op == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos] = rng.randrange(256)
        elif op == 2:
            del data[pos:]
        elif op == 3:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            del data[pos:pos + rng.randint(1, 64)]
        elif op == 5:
            other = rng.choice(seeds)
            src = rng.randrange(len(other))
            data[pos:pos + 32] = other[src:src + 32]
        else:
            size, fmt = rng.choice(((1, "B"), (2, "<H"), (4, "<I"), (4, ">I"), (8, "<Q"), (8, ">Q")))
            value = rng.choice((0, 1, 0x7F, 0xFF, 1 << 15, 1 << 31, 1 << 32, 1 << 62, len(data))) % (1 << 8 * size)
            data[pos:pos + size] = struct.pack(fmt, value)
    return data


def run_random(harness: Callable[[bytes], None], inputs: dict[str, bytes], args: argparse.Namespace) -> int:
    """Mutation fuzzing without coverage feedback (when atheris is not installed)."""
    rng = random.Random(args.seed)
    pool = list(inputs.values())
    deadline = time.monotonic() + args.seconds if args.seconds else float("inf")
    runs = 0
    start = time.monotonic()
    while time.monotonic() < deadline and (not args.runs or runs < args.runs):
        data = bytes(mutate(bytearray(rng.choice(pool)), rng, pool)) if runs >= len(pool) else pool[runs]
        try:
            harness(data)
        except Exception:
            path = args.work / f"crash-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            traceback.print_exc()
            print(f"fuzz: finding after {runs} runs; input saved to {path}", file=sys.stderr)
            return 1
        runs += 1
    print(f"Done {runs} runs in {time.monotonic() - start:.0f} second(s) (random mutations, no coverage feedback)")
    return 0


def replay(harness: Harness, paths: list[Path]) -> int:
    """Run saved inputs (files, or every file in folders); print what each finding raised."""
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    found = 0
    for path in files:
        data = path.read_bytes()
        try:
            harness(data)
        except Exception:
            found += 1
            ctrl = data[0] if data else 0
            print(f"{path}: target {TARGETS[ctrl & 3]}, hash fix {bool(ctrl & 4)}, budget {BUDGETS[(ctrl >> 3) & 7]!r}, "
                  f"{len(data) - CASE_BYTES} artifact bytes")
            traceback.print_exc()
    print(f"replayed {len(files)} input(s): {found} finding(s)" if found else f"replayed {len(files)} input(s): no finding")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0, help="stop after this many seconds")
    ap.add_argument("--runs", type=int, default=0, help="stop after this many executions")
    ap.add_argument("--driver", choices=("auto", "atheris", "random"), default="auto",
                    help="atheris (coverage-guided), random (mutations only), auto: atheris when installed")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "fuzz",
                    help="corpus, findings (crash-*) and baked seeds go here (default out/fuzz)")
    ap.add_argument("--seed-file", type=Path, action="append", default=[], help="another artifact to start from")
    ap.add_argument("--no-bake", action="store_true", help="do not bake the four small seed models (needs torch)")
    ap.add_argument("--memory-mb", type=int, default=2048, help="address space allowed over the start (default 2048)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048, help="libFuzzer's RSS limit (default 2048)")
    ap.add_argument("--timeout", type=int, default=20, help="seconds one input may take (default 20)")
    ap.add_argument("--keep-going", action="store_true",
                    help="save each finding (finding-*) and go on instead of stopping at the first")
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    ap.add_argument("--replay", type=Path, action="append",
                    help="run this saved input (or every file in this folder) and print what it raises; repeatable")
    args = ap.parse_args(argv)
    if not (args.seconds or args.runs or args.replay):
        ap.error("give --seconds, --runs or --replay")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    driver = args.driver
    if driver == "auto":
        try:
            import atheris  # noqa: F401
            driver = "atheris"
        except ImportError:
            driver = "random"
            print("fuzz: atheris is not installed (pip install atheris); random mutations, no coverage feedback",
                  file=sys.stderr)
    if driver == "atheris" and not args.replay:  # instrument before anything imports stn_edge
        import atheris

        with atheris.instrument_imports(include=["stn_edge", "msgpack"],
                                        exclude=["stn_edge.host"]):
            import stn_edge.cli  # noqa: F401
            import stn_edge.device.backends.numpy  # noqa: F401
            import stn_edge.device.remote  # noqa: F401
            import stn_edge.device.runtime  # noqa: F401
    seeds = load_seeds(args.seed_file, bake=not args.no_bake, work=args.work)
    harness = Harness(seeds, scratch_dir(args.work))
    limit_memory(args.memory_mb)
    try:
        if args.replay:
            return replay(harness, args.replay)
        inputs = seed_inputs(seeds)
        print(f"fuzz: {driver}, {len(seeds)} seed artifacts, {len(inputs)} seed inputs, work folder {args.work}",
              file=sys.stderr)
        target = KeepGoing(harness, args.work) if args.keep_going else harness
        return run_atheris(target, inputs, args) if driver == "atheris" else run_random(target, inputs, args)
    finally:
        harness.close()


if __name__ == "__main__":
    sys.exit(main())
