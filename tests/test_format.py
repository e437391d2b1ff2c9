"""The .stn format: golden bytes, round trips, and refusal of broken files."""
from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest

from stn_edge.errors import ArtifactError
from stn_edge.format import FORMAT_MAJOR, MAGIC, PREAMBLE, ArtifactBuilder, ArtifactReader, write_atomic
from tiny import tiny_bytes, tiny_parts

GOLDEN = Path(__file__).parent / "golden" / "tiny-v1.stn"
GOLDEN_SHA256 = "58107cd0f61890924868404738c0f6533bc67c847cbd7bdc369c1f4360c12f6e"


def test_writer_reproduces_golden_bytes():
    data = tiny_bytes()
    assert data == GOLDEN.read_bytes()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256


def test_golden_file_reads_back_exact_arrays():
    _, _, arrays = tiny_parts()
    with ArtifactReader(GOLDEN) as r:
        assert r.version == (1, 0)
        layer = r.header["layers"][0]
        np.testing.assert_array_equal(r.read_array(layer["dense"]), arrays["W"])
        np.testing.assert_array_equal(r.read_array(r.header["tensors"]["c"]), arrays["c"])
        np.testing.assert_array_equal(r.read_rows(layer["factors"]["a"], 0, 2), arrays["a"][:3])
        np.testing.assert_array_equal(r.read_rows(layer["factors"]["b"], 1, 3), arrays["b"][1:5])


def test_preamble_layout_is_as_specified():
    data = GOLDEN.read_bytes()
    magic, major, minor, header_len, digest = PREAMBLE.unpack(data[:48])
    assert magic == MAGIC and (major, minor) == (1, 0)
    assert hashlib.sha256(data[48:48 + header_len]).digest() == digest
    data_start = (48 + header_len + 63) // 64 * 64
    header = msgpack.unpackb(data[48:48 + header_len])
    assert data_start + header["data_size"] == len(data)
    for ref in header["tensors"].values():
        assert ref["block"]["offset"] % 64 == 0


def test_prefix_read_counts_only_those_bytes():
    with ArtifactReader(GOLDEN) as r:
        opened = r.bytes_read
        a = r.header["layers"][0]["factors"]["a"]
        r.read_rows(a, 0, 1)
        assert r.bytes_read - opened == 1 * 16 * 4
        r.read_rows(a, 1, 3)
        assert r.bytes_read - opened == 5 * 16 * 4


def test_reads_from_file_object_and_bytes():
    data = GOLDEN.read_bytes()
    for src in (io.BytesIO(data), data, str(GOLDEN), GOLDEN):
        r = ArtifactReader(src)
        assert r.header["full_bytes"] == 544
        r.close()


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.stn"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.stn"]


def _corrupt(data: bytes, pos: int, value: bytes) -> bytes:
    return data[:pos] + value + data[pos + len(value):]


def _with_header(header: dict, data_tail: bytes | None = None) -> bytes:
    """Re-pack ``header`` with a valid checksum over the golden file's data section."""
    golden = GOLDEN.read_bytes()
    _, _, _, hlen, _ = PREAMBLE.unpack(golden[:48])
    start = (48 + hlen + 63) // 64 * 64
    tail = golden[start:] if data_tail is None else data_tail
    packed = msgpack.packb(header, use_bin_type=True)
    head = PREAMBLE.pack(MAGIC, 1, 0, len(packed), hashlib.sha256(packed).digest()) + packed
    head += b"\0" * ((len(head) + 63) // 64 * 64 - len(head))
    return head + tail


def _golden_header() -> dict:
    data = GOLDEN.read_bytes()
    _, _, _, hlen, _ = PREAMBLE.unpack(data[:48])
    return msgpack.unpackb(data[48:48 + hlen])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"GIF89a" + d[6:], "not a .stn artifact"),
        (lambda d: d[:20], "too short"),
        (lambda d: d[:-100], "truncated"),
        (lambda d: _corrupt(d, 8, struct.pack("<H", FORMAT_MAJOR + 1)), "newer than this reader"),
        (lambda d: _corrupt(d, 12, struct.pack("<I", 2**31)), "header length"),
        (lambda d: _corrupt(d, 60, b"\xff"), "header checksum"),
        (lambda d: b"", "too short"),
    ],
)
def test_broken_files_are_refused(mutate, message):
    with pytest.raises(ArtifactError, match=message):
        ArtifactReader(mutate(GOLDEN.read_bytes()))


def test_corrupt_block_is_caught_when_read():
    data = bytearray(GOLDEN.read_bytes())
    data[-1] ^= 0xFF  # last byte belongs to the calibration outputs
    r = ArtifactReader(bytes(data))
    r.read_array(r.header["tensors"]["c"])  # other blocks still read fine
    with pytest.raises(ArtifactError, match="SHA-256"):
        r.read_array(r.header["calibration"]["outputs"]["y"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["tensors"]["c"]["block"].update(offset=10**9), "past the data section"),
        (lambda h: h["tensors"]["c"].update(shape=[9]), "need"),
        (lambda h: h["tensors"]["c"].update(shape=[-8]), "non-negative integer"),
        (lambda h: h["tensors"]["c"].update(dtype="object"), "unknown dtype"),
        (lambda h: h["tensors"]["c"]["block"].update(sha256=b"short"), "32 bytes"),
        (lambda h: h["tensors"]["c"].update(block=h["layers"][0]["dense"]["block"], shape=[128]), "overlap"),
        (lambda h: h["layers"][0]["ladder"].update(ranks=[3, 1, 5]), "strictly increasing"),
        (lambda h: h["layers"][0]["ladder"].update(loss=[float("nan"), 0.0, 0.0]), "finite"),
        (lambda h: h["layers"][0]["ladder"].update(bytes=[1, 2, 3]), "factor blocks hold"),
        (lambda h: h["model"].update(nodes="Gemm"), "must be a list"),
        (lambda h: h.pop("layers"), "layers must be a list"),
        (lambda h: h.update(data_size=10**12), "truncated"),
    ],
)
def test_inconsistent_headers_are_refused(edit, message):
    header = _golden_header()
    edit(header)
    with pytest.raises(ArtifactError, match=message):
        ArtifactReader(_with_header(header))


def test_builder_rejects_bad_row_segments():
    b = ArtifactBuilder()
    with pytest.raises(ValueError, match="row_ends"):
        b.add_rows(np.zeros((4, 2), np.float32), [1, 1, 4])
    with pytest.raises(ValueError, match="row_ends"):
        b.add_rows(np.zeros((4, 2), np.float32), [2, 3])


def test_scalar_and_empty_arrays_round_trip():
    b = ArtifactBuilder()
    refs = {k: b.add_array(v) for k, v in {"s": np.array(3, np.int64), "e": np.zeros((0, 4), np.float32)}.items()}
    header = {"model": {"inputs": [], "outputs": [], "nodes": []}, "tensors": refs, "layers": [], "full_bytes": 8}
    r = ArtifactReader(b.to_bytes(header))
    s = r.read_array(r.header["tensors"]["s"])
    assert s.shape == () and s == 3
    assert r.read_array(r.header["tensors"]["e"]).shape == (0, 4)
