"""Write the corpus of hostile artifacts that every reader must refuse: ``tests/corpus/``.

Each file is derived from the golden artifact (``tests/golden/tiny-v1.stn``) by one attack. The
manifest (``tests/corpus/MANIFEST.json``) says for each file what it attacks, the stage that must
refuse it (``open``: :class:`~stn_edge.format.ArtifactReader`; ``load``: only reading its blocks
can tell, so ``Runtime.load``) and a regex the :class:`~stn_edge.errors.ArtifactError` message
matches. ``tests/test_hostile_artifacts.py`` opens every file.

    python tools/make_hostile_corpus.py            # rewrite tests/corpus/
    python tools/make_hostile_corpus.py --check    # fail if the committed corpus differs

The files are deterministic: running the script twice gives the same bytes.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import msgpack

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny-v1.stn"
CORPUS = ROOT / "tests" / "corpus"
MAGIC = b"\x89STN\r\n\x1a\n"
PREAMBLE = struct.Struct("<8sHHI32s")


def _split(data: bytes) -> tuple[dict, bytes]:
    hlen = PREAMBLE.unpack(data[:48])[3]
    start = (48 + hlen + 63) // 64 * 64
    return msgpack.unpackb(data[48:48 + hlen]), data[start:]


def _pack(packed: bytes, tail: bytes, major: int = 1, minor: int = 0, digest: bytes | None = None) -> bytes:
    """An artifact whose header bytes are ``packed`` (valid checksum unless ``digest`` is given)."""
    digest = hashlib.sha256(packed).digest() if digest is None else digest
    head = PREAMBLE.pack(MAGIC, major, minor, len(packed), digest) + packed
    return head + b"\0" * ((len(head) + 63) // 64 * 64 - len(head)) + tail


def _header_file(edit: Callable[[dict], Any]) -> Callable[[bytes], bytes]:
    """A file whose header is the golden one after ``edit``, re-packed with a valid checksum."""

    def make(golden: bytes) -> bytes:
        header, tail = _split(golden)
        header = copy.deepcopy(header)
        edit(header)
        return _pack(msgpack.packb(header, use_bin_type=True), tail)

    return make


def _raw_header(packed: bytes) -> Callable[[bytes], bytes]:
    return lambda golden: _pack(packed, _split(golden)[1])


def _preamble_field(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda g: g[:offset] + value + g[offset + len(value):]


def _flip(pos: int) -> Callable[[bytes], bytes]:
    def make(g: bytes) -> bytes:
        b = bytearray(g)
        b[pos] ^= 0xFF
        return bytes(b)

    return make


def _flip_dense_block(g: bytes) -> bytes:
    """One byte flipped inside the layer's dense weight: the header is intact, the data is not."""
    header, _ = _split(g)
    hlen = PREAMBLE.unpack(g[:48])[3]
    pos = (48 + hlen + 63) // 64 * 64 + header["layers"][0]["dense"]["block"]["offset"] + 5
    return _flip(pos)(g)


def _nested(depth: int) -> bytes:
    """A header map whose 'model' is ``depth`` nested one-element arrays."""
    return b"\x81\xa5model" + b"\x91" * depth + b"\x00"


def _layer(h: dict) -> dict:
    return h["layers"][0]


#: a size no device holds, declared by ``calibration-1tib.stn``
HUGE = 1 << 40


def _declare_huge_calibration(h: dict) -> None:
    """The calibration output ``y`` declared as 2^38 float32 in a block past the data, ``data_size`` to match."""
    h["calibration"]["outputs"]["y"] = {"dtype": "float32", "shape": [HUGE // 4],
                                        "block": {"offset": h["data_size"], "size": HUGE, "sha256": b"\0" * 32}}
    h["data_size"] += HUGE


def _nest_attr(h: dict, depth: int) -> None:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    h["model"]["nodes"][0]["attrs"]["alpha"] = value


#: name -> (what it attacks, stage that refuses it, message regex, how to make it from the golden bytes)
ATTACKS: dict[str, tuple[str, str, str, Callable[[bytes], bytes]]] = {
    # --- preamble
    "empty": ("a zero-byte file", "open", "too short", lambda g: b""),
    "short-preamble": ("20 bytes: a preamble cut short", "open", "too short", lambda g: g[:20]),
    "wrong-magic": ("a GIF wearing the .stn name", "open", "bad magic", lambda g: b"GIF89a" + g[6:]),
    "crlf-mangled-magic": ("magic after a text-mode transfer", "open", "bad magic",
                           lambda g: g[:4] + b"\n" + g[6:]),
    "future-major": ("format version 2.0", "open", "newer than this reader", _preamble_field(8, struct.pack("<H", 2))),
    "major-zero": ("format version 0.x", "open", "not supported", _preamble_field(8, struct.pack("<H", 0))),
    "header-len-max": ("header_len = 2^32 - 1", "open", "header length", _preamble_field(12, struct.pack("<I", 2**32 - 1))),
    "header-len-past-end": ("header_len points past the end of the file", "open", "header length",
                            lambda g: g[:12] + struct.pack("<I", len(g)) + g[16:]),
    "header-hash-mismatch": ("one header byte flipped", "open", "header checksum", _flip(60)),
    # --- msgpack
    "not-msgpack": ("header bytes that are not msgpack", "open", "not valid msgpack", _raw_header(b"\xc1" * 64)),
    "header-not-map": ("header is a list", "open", "header must be a map", _raw_header(msgpack.packb([1, 2, 3]))),
    "trailing-bytes": ("valid msgpack followed by garbage inside header_len", "open", "not valid msgpack",
                       lambda g: _pack(g[48:48 + PREAMBLE.unpack(g[:48])[3]] + b"\x00\x01", _split(g)[1])),
    "nesting-1000": ("1000 nested arrays: deep, but within msgpack's stack", "open", "invalid header",
                     _raw_header(_nested(1000))),
    "nesting-10000": ("10000 nested arrays", "open", "not valid msgpack", _raw_header(_nested(10_000))),
    "str-len-4g": ("a str32 that claims 4 GiB", "open", "not valid msgpack",
                   _raw_header(b"\x81\xa5model\xdb\xff\xff\xff\xff" + b"x" * 16)),
    "array-len-4g": ("an array32 that claims 2^32 - 1 items", "open", "not valid msgpack",
                     _raw_header(b"\x81\xa5model\xdd\xff\xff\xff\xff" + b"\x00" * 16)),
    "map-len-4g": ("a map32 that claims 2^32 - 1 entries", "open", "not valid msgpack",
                   _raw_header(b"\xdf\xff\xff\xff\xff" + b"\xa1a\x00" * 4)),
    "ext-type": ("a msgpack extension type (code smuggling)", "open", "not valid msgpack",
                 _raw_header(b"\x81\xa5model\xd4\x01\x00")),
    "invalid-utf8": ("a string that is not UTF-8", "open", "not valid msgpack", _raw_header(b"\x81\xa2\xff\xfe\x00")),
    "int-map-key": ("a map with an integer key", "open", "not valid msgpack", _raw_header(b"\x81\x01\x00")),
    "container-bomb": ("16 Ki empty arrays: 70x its size once unpacked", "open", "more than .* containers",
                       _raw_header(b"\x81\xa1x\xdd" + struct.pack(">I", 16384) + b"\x90" * 16384)),
    "element-bomb": ("16 Ki negative fixints: 36x its size once unpacked", "open", "more than .* elements",
                     _raw_header(b"\x81\xa1x\xdd" + struct.pack(">I", 16384) + b"\xe0" * 16384)),
    # --- blocks
    "calibration-1tib": ("a calibration output of 1 TiB, data_size raised to hold it: locally the file is too short; "
                         "a server that claims that size must not make the reader allocate it (tests/test_fuzz.py)",
                         "open", "data_size .* exceeds", _header_file(_declare_huge_calibration)),
    "offset-past-end": ("a block at offset 10^9", "open", "past the data section",
                        _header_file(lambda h: h["tensors"]["c"]["block"].update(offset=10**9))),
    "offset-negative": ("a block at offset -1", "open", "non-negative integer",
                        _header_file(lambda h: h["tensors"]["c"]["block"].update(offset=-1))),
    "size-huge": ("a block of 2^62 bytes", "open", "past the data section",
                  _header_file(lambda h: h["tensors"]["c"]["block"].update(size=2**62))),
    "size-over-2-62": ("a block size beyond 2^62", "open", "non-negative integer",
                       _header_file(lambda h: h["tensors"]["c"]["block"].update(size=2**63))),
    "overlapping-blocks": ("two arrays sharing bytes", "open", "overlap",
                           _header_file(lambda h: h["tensors"].update(d=copy.deepcopy(_layer(h)["dense"])))),
    "data-size-lie": ("data_size larger than the file", "open", "truncated", _header_file(lambda h: h.update(data_size=10**12))),
    "truncated-data": ("the file cut inside its data section", "open", "truncated", lambda g: g[:-100]),
    "sha-short": ("a 5-byte digest", "open", "32 bytes",
                  _header_file(lambda h: h["tensors"]["c"]["block"].update(sha256=b"short"))),
    "block-hash-mismatch": ("one data byte flipped (hashes are checked on read)", "load", "SHA-256", _flip_dense_block),
    # --- arrays
    "shape-negative": ("shape [-8]", "open", "non-negative integer", _header_file(lambda h: h["tensors"]["c"].update(shape=[-8]))),
    "shape-absurd": ("shape [2^31, 2^31, 2^31]", "open", "need",
                     _header_file(lambda h: h["tensors"]["c"].update(shape=[2**31] * 3))),
    "shape-nine-dims": ("a 9-d shape", "open", "at most 8", _header_file(lambda h: h["tensors"]["c"].update(shape=[1] * 9))),
    "shape-not-list": ("shape given as a string", "open", "must be a list", _header_file(lambda h: h["tensors"]["c"].update(shape="8"))),
    "dtype-object": ("dtype 'object' (pickle by the back door)", "open", "unknown dtype",
                     _header_file(lambda h: h["tensors"]["c"].update(dtype="object"))),
    "dtype-unhashable": ("dtype given as a list", "open", "unknown dtype",
                         _header_file(lambda h: h["tensors"]["c"].update(dtype=["float32"]))),
    "mixed-block-kinds": ("a single-block array that also carries 'blocks'", "open", "must not carry",
                          _header_file(lambda h: h["tensors"]["c"].update(blocks=[{"offset": "x"}]))),
    "bytes-tensor-name": ("a tensor name that is bytes, not a string", "open", "keys are strings",
                          _header_file(lambda h: h["tensors"].update({b"c2": h["tensors"].pop("c")}))),
    "row-ends-short": ("row segments that do not cover the rows", "open", "row segments",
                       _header_file(lambda h: _layer(h)["factors"]["a"].update(row_ends=[1, 3, 4]))),
    "segments-not-contiguous": ("a gap between row segments", "open", "holds|contiguous|overlap",
                                _header_file(lambda h: _layer(h)["factors"]["a"]["blocks"][1].update(
                                    offset=_layer(h)["factors"]["a"]["blocks"][1]["offset"] + 64))),
    # --- layers and ladders
    "ladder-ranks-decreasing": ("ranks [3, 1, 5]", "open", "strictly increasing",
                                _header_file(lambda h: _layer(h)["ladder"].update(ranks=[3, 1, 5]))),
    "ladder-loss-nan": ("a NaN predicted loss", "open", "finite",
                        _header_file(lambda h: _layer(h)["ladder"].update(loss=[float("nan"), 0.0, 0.0]))),
    "ladder-bytes-lie": ("ladder bytes that the blocks do not hold", "open", "factor blocks hold",
                         _header_file(lambda h: _layer(h)["ladder"].update(bytes=[1, 2, 3]))),
    "ladder-length-mismatch": ("a ladder of 4096 ranks but 3 byte costs", "open", "equal length",
                               _header_file(lambda h: _layer(h)["ladder"].update(ranks=list(range(1, 4097))))),
    "max-rank-too-small": ("max_rank below the ladder's top rank", "open", "max_rank",
                           _header_file(lambda h: _layer(h).update(max_rank=2))),
    "duplicate-layer": ("the same layer twice", "open", "appears twice|overlap",
                        _header_file(lambda h: h["layers"].append(copy.deepcopy(_layer(h))))),
    "layer-missing-node": ("a layer whose node does not exist", "open", "missing or does not read",
                           _header_file(lambda h: _layer(h).update(node="nope"))),
    "layer-weight-not-read": ("a layer whose node does not read its weight", "open", "missing or does not read",
                              _header_file(lambda h: _layer(h).update(weight="nope"))),
    "weight-not-string": ("a layer weight that is a list", "open", "must be a string",
                          _header_file(lambda h: _layer(h).update(weight=["W"]))),
    # --- graph
    "node-not-map": ("a node that is a string", "open", "must be a map", _header_file(lambda h: h["model"]["nodes"].append("Gemm"))),
    "node-domain-list": ("a node domain that is a list", "open", "domain must be a string",
                         _header_file(lambda h: h["model"]["nodes"][0].update(domain=["x"]))),
    "attr-nesting-900": ("an attribute nested 900 levels (recursion in graph readers)", "open", "nests deeper",
                         _header_file(lambda h: _nest_attr(h, 900))),
    "attr-map": ("an attribute that is an arbitrary map", "open", "must be a number",
                 _header_file(lambda h: h["model"]["nodes"][0]["attrs"].update(alpha={"k": 1}))),
    "attr-tensor-size-lie": ("a tensor attribute whose data does not match its shape", "open", "data must be bytes",
                             _header_file(lambda h: h["model"]["nodes"][0]["attrs"].update(
                                 value={"tensor": {"dtype": "float32", "shape": [1000], "data": b"\0" * 4}}))),
    "dangling-input": ("a node input that nothing provides (its tensor is gone)", "open", "which no graph input",
                       _header_file(lambda h: h["tensors"].pop("c"))),
    "duplicate-node-name": ("two nodes with one name", "open", "appears twice",
                            _header_file(lambda h: h["model"]["nodes"][1].update(name=h["model"]["nodes"][0]["name"]))),
    "calibration-unknown-input": ("calibration for an input the model does not have", "open", "not a model input",
                                  _header_file(lambda h: h["calibration"]["inputs"].update(
                                      zz=h["calibration"]["inputs"].pop("x")))),
    "full-bytes-negative": ("full_bytes = -1", "open", "non-negative integer", _header_file(lambda h: h.update(full_bytes=-1))),
    # --- family fields (found by tools/fuzz.py: a renamed factor raised KeyError in the lowering)
    "factor-renamed": ("an svd layer whose factor 'b' is called 'X' (found by tools/fuzz.py)", "open",
                       "family svd stores", _header_file(lambda h: _layer(h)["factors"].update(X=_layer(h)["factors"].pop("b")))),
    "structure-not-map": ("a layer structure that is an integer", "open", "structure must be a map",
                          _header_file(lambda h: _layer(h).update(structure=1))),
    "bonds-ragged": ("ladder bonds of unequal lengths", "open", "one list of 1-8 bond ranks per level",
                     _header_file(lambda h: _layer(h)["ladder"].update(bonds=[[1], [3, 1], [5]]))),
    "bonds-decreasing": ("a bond rank that shrinks from one level to the next", "open", "never decrease",
                         _header_file(lambda h: _layer(h)["ladder"].update(bonds=[[1], [3], [2]]))),
    "shells-past-bonds": ("a nested-shell factor naming a bond the ladder does not have", "open", "two of its 1 ladder bonds",
                          _header_file(lambda h: (_layer(h)["ladder"].update(bonds=[[1], [3], [5]]),
                                                  _layer(h).update(structure={"shells": {"a": [0, 5]}})))),
    "tied-not-list": ("tied uses that are a string", "open", "tied must be a list", _header_file(lambda h: _layer(h).update(tied="fc"))),
    "tied-without-swap": ("a tied use without its swap flag", "open", "swap must be true or false",
                          _header_file(lambda h: _layer(h).update(tied=[{"node": "act", "kind": "linear"}]))),
    "structure-missing": ("an svd-spatial layer without its structure (found by tools/fuzz.py)", "open",
                          "structure is missing", _header_file(lambda h: _layer(h).update(family="svd-spatial"))),
    "tt-without-modes": ("a tt layer without in_modes and out_modes", "open", "needs in_modes and out_modes",
                         _header_file(lambda h: _layer(h).update(family="tt", structure={}))),
    "value-shapes-huge": ("a recorded activation of 2^60 elements (would plan an absurd activation budget)", "open",
                          "elements", _header_file(lambda h: h.update(value_shapes={"x": [[1 << 30, 1 << 30], [2, 4], "float32"]}))),
    "value-shapes-negative": ("a recorded activation with a negative dimension", "open", "non-negative integer",
                              _header_file(lambda h: h.update(value_shapes={"x": [[1, -4], [2, 4], "float32"]}))),
    "value-shapes-ragged": ("a value_shapes record that is not [shape, shape, dtype]", "open", "must be \\[shape at batch 1",
                            _header_file(lambda h: h.update(value_shapes={"x": [[1, 4]]}))),
}


def build() -> dict[str, bytes]:
    """Every corpus file's bytes, by file name, plus ``MANIFEST.json``."""
    golden = GOLDEN.read_bytes()
    files: dict[str, bytes] = {}
    manifest = {}
    for name, (attack, stage, match, make) in ATTACKS.items():
        files[f"{name}.stn"] = make(golden)
        manifest[f"{name}.stn"] = {"attack": attack, "stage": stage, "match": match}
    files["MANIFEST.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed corpus instead of writing")
    args = ap.parse_args(argv)
    files = build()
    if args.check:
        stale = [n for n, data in files.items() if not (CORPUS / n).is_file() or (CORPUS / n).read_bytes() != data]
        extra = sorted(p.name for p in CORPUS.glob("*") if p.name not in files)
        if stale or extra:
            print(f"corpus out of date: differs {stale}, unexpected {extra}; run tools/make_hostile_corpus.py")
            return 1
        print(f"corpus up to date: {len(files) - 1} files")
        return 0
    CORPUS.mkdir(parents=True, exist_ok=True)
    for old in CORPUS.glob("*.stn"):
        if old.name not in files:
            old.unlink()
    for name, data in files.items():
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(files) - 1} hostile artifacts and MANIFEST.json to {CORPUS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
