"""Hostile artifacts: the committed corpus of broken files, decompression bombs, long ladders, and
mutation fuzzing of the golden and a baked artifact. Only ArtifactError may come out, in bounded time.

What these tests establish is summarized in docs/RELIABILITY.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memtools import tool as _tool
from stn_edge.device import Runtime
from stn_edge.errors import ArtifactError, STNError
from stn_edge.format import MAGIC, PREAMBLE, ArtifactReader

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny-v1.stn"
CORPUS = ROOT / "tests" / "corpus"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())
#: every refusal must come this fast; the slowest corpus file takes milliseconds
OPEN_SECONDS = 2.0


def _split(data: bytes) -> tuple[dict, bytes]:
    hlen = PREAMBLE.unpack(data[:48])[3]
    return msgpack.unpackb(data[48:48 + hlen]), data[(48 + hlen + 63) // 64 * 64:]


def _join(packed: bytes, tail: bytes) -> bytes:
    head = PREAMBLE.pack(MAGIC, 1, 0, len(packed), hashlib.sha256(packed).digest()) + packed
    return head + b"\0" * ((len(head) + 63) // 64 * 64 - len(head)) + tail


def _read_everything(reader: ArtifactReader) -> None:
    h = reader.header
    for ref in h["tensors"].values():
        reader.read_array(ref)
    for layer in h["layers"]:
        reader.read_array(layer["dense"])
        for ref in layer["factors"].values():
            reader.read_rows(ref, 0, len(ref["blocks"]))
    for group in (h.get("calibration") or {}).values():
        for ref in group.values():
            reader.read_array(ref)


def _open_only_artifact_errors(data: bytes) -> ArtifactReader | None:
    """Open and read everything; only ArtifactError may escape (returned as None), in bounded time."""
    start = time.perf_counter()
    try:
        reader = ArtifactReader(data)
        _read_everything(reader)
    except ArtifactError as exc:
        reader = None
        event(f"reader refused: {_reason(exc)}")
    assert time.perf_counter() - start < OPEN_SECONDS
    return reader


def _reason(exc: Exception) -> str:
    """The kind of a refusal, for hypothesis statistics: the message without names and numbers."""
    text = str(exc).split(": ", 1)[-1]
    return re.sub(r"\[[^\]]*\]|'[^']*'|\d+", "_", text.split(";")[0])[:60]


# --------------------------------------------------------------------------- the hostile corpus


def test_corpus_matches_its_generator():
    files = _tool("make_hostile_corpus").build()
    committed = {p.name: p.read_bytes() for p in CORPUS.iterdir()}
    assert committed == files, "run tools/make_hostile_corpus.py"


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_file_is_refused(name):
    info, data = MANIFEST[name], (CORPUS / name).read_bytes()
    start = time.perf_counter()
    if info["stage"] == "open":
        with pytest.raises(ArtifactError, match=info["match"]):
            ArtifactReader(data)
    else:
        ArtifactReader(data).close()  # a valid header: only reading the blocks can tell
    with pytest.raises(ArtifactError, match=info["match"]):
        Runtime.load(data, backend="numpy")
    assert time.perf_counter() - start < OPEN_SECONDS


_BOMB_SCRIPT = r"""
import hashlib, json, struct, sys, time
from stn_edge.errors import ArtifactError
from stn_edge.format import MAGIC, PREAMBLE, ArtifactReader

def status():
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

size = int(sys.argv[1])
# item encodings that unpack into the most Python memory per byte
items = {"empty arrays": b"\x90", "negative ints": b"\xe0", "short strings": b"\xa2ab",
         "short bins": b"\xc4\x01x", "floats": b"\xcb" + b"\x01" * 8}
out = {}
for kind, item in items.items():
    per_array = 65536  # msgpack's per-container limit is 2^18
    arrays = size // (len(item) * per_array)
    packed = b"\x81\xa1x\xdd" + struct.pack(">I", arrays) + (b"\xdd" + struct.pack(">I", per_array) + item * per_array) * arrays
    head = PREAMBLE.pack(MAGIC, 1, 0, len(packed), hashlib.sha256(packed).digest()) + packed
    data = head + b"\0" * ((len(head) + 63) // 64 * 64 - len(head))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    rss0, _ = status()
    start = time.perf_counter()
    try:
        ArtifactReader(data)
        refused = False
    except ArtifactError:
        refused = True
    out[kind] = {"header": len(packed), "peak_growth": status()[1] - rss0,
                 "seconds": time.perf_counter() - start, "refused": refused}
print(json.dumps(out))
"""


def test_dense_headers_cost_bounded_memory_and_time(tmp_path):
    """4 MiB headers built to unpack into as many Python objects as possible: refused, and the peak
    memory while refusing stays under 28x the header (measured worst: 3-byte strings, ~25x; a real
    header unpacks to ~5.4x; without the object cap, empty arrays reach 70x)."""
    script = tmp_path / "bomb.py"
    script.write_text(_BOMB_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(4 << 20)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.splitlines()[-1])
    for kind, r in results.items():
        assert r["refused"], (kind, r)
        assert r["peak_growth"] < 28 * r["header"], (kind, r)
        assert r["seconds"] < OPEN_SECONDS, (kind, r)


def test_long_ladders_are_checked_in_linear_time(tmp_path):
    """20000 levels x 2 factors: a quadratic ladder check would take minutes."""
    from stn_edge.format import ArtifactBuilder

    header, _ = _split(GOLDEN.read_bytes())
    n = 20000
    b = ArtifactBuilder()
    layer = header["layers"][0]
    layer["dense"] = b.add_array(np.zeros((8, 16), np.float32))
    ends = list(range(1, n + 1))
    layer["factors"] = {"a": b.add_rows(np.zeros((n, 1), np.float32), ends), "b": b.add_rows(np.zeros((n, 1), np.float32), ends)}
    layer["ladder"] = {"ranks": ends, "bytes": [8 * k for k in ends], "loss": [0.0] * n}
    layer["max_rank"] = n
    header["tensors"] = {"c": b.add_array(np.zeros(8, np.float32))}
    header.pop("calibration")
    start = time.perf_counter()
    ArtifactReader(b.to_bytes(header)).close()
    assert time.perf_counter() - start < OPEN_SECONDS


# --------------------------------------------------------------------------- mutation fuzzing

_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
    st.tuples(st.just("splice"), st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True)),
)


def _mutate(data: bytes, ops: list, fix_header_hash: bool) -> bytes:
    b = bytearray(data)
    for kind, where, arg in ops:
        if not b:
            break
        pos = int(where * len(b))
        if kind == "flip":
            b[pos] ^= arg
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes((pos * 131 + i * 17) & 0xFF for i in range(arg))
        elif kind == "delete":
            del b[pos:pos + arg]
        else:  # copy a 32-byte run from elsewhere over this spot
            src = int(arg * len(b))
            b[pos:pos + 32] = b[src:src + 32]
    if fix_header_hash and len(b) >= 48:  # let the mutation reach msgpack and the validator
        hlen = PREAMBLE.unpack(bytes(b[:48]))[3]
        if 48 + hlen <= len(b):
            b[16:48] = hashlib.sha256(bytes(b[48:48 + hlen])).digest()
    return bytes(b)


#: examples per fuzz test; a longer campaign: STN_FUZZ_EXAMPLES=5000 pytest tests/test_hostile_artifacts.py -k "mutated or hostile"
FUZZ_EXAMPLES = int(os.environ.get("STN_FUZZ_EXAMPLES", "150"))
_FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_FUZZ
@given(ops=st.lists(_MUTATION, min_size=1, max_size=4), fix=st.booleans())
def test_mutated_golden_bytes_only_raise_artifact_error(ops, fix):
    _open_only_artifact_errors(_mutate(GOLDEN.read_bytes(), ops, fix))


@_FUZZ
@given(ops=st.lists(_MUTATION, min_size=1, max_size=4), fix=st.booleans())
def test_mutated_baked_bytes_only_raise_artifact_error(mlp_path, ops, fix):
    _open_only_artifact_errors(_mutate(mlp_path.read_bytes(), ops, fix))


_HOSTILE_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.sampled_from([0, 1, -1, 2**31, 2**62, 2**62 + 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["float32", "object", "svd", "linear", "conv", "Gemm", "x", "W", "fc", ""]),
    st.binary(max_size=40),
)
_HOSTILE_VALUE = st.recursive(
    _HOSTILE_SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


def _paths(x, path=()):
    yield path
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, path + (i,))


def _edit_header(header: dict, data: st.DataObject, edits: int) -> dict:
    header = copy.deepcopy(header)
    for _ in range(edits):
        paths = list(_paths(header))[1:]
        path = data.draw(st.sampled_from(paths))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "copy"]))
        if action == "replace":
            parent[path[-1]] = data.draw(_HOSTILE_VALUE)
        elif action == "delete":
            del parent[path[-1]]
        else:  # a value from elsewhere in the header: a classic source of confused types
            other = header
            for key in data.draw(st.sampled_from(paths)):
                other = other[key]
            parent[path[-1]] = copy.deepcopy(other)
    return header


def _check_hostile_header(base: bytes, data: st.DataObject) -> None:
    header, tail = _split(base)
    header = _edit_header(header, data, data.draw(st.integers(1, 3)))
    blob = _join(msgpack.packb(header, use_bin_type=True), tail)
    if _open_only_artifact_errors(blob) is None:
        return
    # the header passed validation: loading and running may refuse only with stn-edge's typed errors
    try:
        with Runtime.load(blob, mem_limit="50%", backend="numpy") as rt:
            rt.verify()
            rt.rescale(None)
            rt.verify()
        event("loaded, ran and rescaled")
    except STNError as exc:
        event(f"runtime refused: {type(exc).__name__}")


@_FUZZ
@given(data=st.data())
def test_hostile_values_in_golden_header_are_refused_cleanly(data):
    _check_hostile_header(GOLDEN.read_bytes(), data)


@_FUZZ
@given(data=st.data())
def test_hostile_values_in_baked_header_are_refused_cleanly(mlp_path, data):
    _check_hostile_header(mlp_path.read_bytes(), data)
