"""The ``.stn`` artifact: write, open, validate, read. Specified in ``docs/FORMAT.md``.

Layout::

    preamble  48 bytes   magic(8) major:u16 minor:u16 header_len:u32 header_sha256(32)
    header    msgpack    header_len bytes
    padding   to a multiple of 64
    data      raw little-endian arrays; every block offset is relative to the data start

Nothing in a file can execute code: the header is msgpack with no extension types, the data section
holds raw numbers. Every block carries a SHA-256 that is checked for exactly the bytes that are read.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import reprlib
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import msgpack
import numpy as np

from stn_edge import families
from stn_edge.errors import ArtifactError
from stn_edge.graph import DTYPES

MAGIC = b"\x89STN\r\n\x1a\n"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1
#: header keys each minor version added; the writer stamps the lowest minor that describes a header
MINOR_KEYS = {1: ("value_shapes",)}
PREAMBLE = struct.Struct("<8sHHI32s")
ALIGN = 64
#: the largest header a reader accepts; real headers are kilobytes to a few megabytes
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: msgpack limits: no container or string in a valid header comes near these
_UNPACK_LIMITS = dict(max_str_len=1 << 20, max_array_len=1 << 18, max_map_len=1 << 18, max_ext_len=0)
#: a header may unpack into at most ``len / 8`` containers and ``len / 2`` elements (plus a floor).
#: Baked headers have ~56 bytes per container and ~11 per element; without this cap a hostile header
#: of one-byte empty lists unpacks into 70x its length in Python objects (see docs/RELIABILITY.md)
_HEADER_OBJECT_FLOOR = 4096
#: node attributes are scalars, tensors or lists of them: a few levels deep at most
_MAX_ATTR_DEPTH = 4


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _short(x: Any, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages: hostile values can be huge or deeply nested."""
    text = reprlib.repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- writing


class ArtifactBuilder:
    """Collects data blocks, then writes header + blocks atomically.

    Array references returned by the ``add_*`` methods go into the header wherever the caller
    wants them; :meth:`write` serializes the header and the data section.

    Examples
    --------
    >>> b = ArtifactBuilder()
    >>> ref = b.add_array(np.arange(4, dtype=np.float32))
    >>> b.write("tiny.stn", {"tensors": {"x": ref}})  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def _append(self, data: bytes) -> dict[str, Any]:
        block = {"offset": self._size, "size": len(data), "sha256": hashlib.sha256(data).digest()}
        self._chunks.append(data)
        self._size += len(data)
        return block

    def _pad(self) -> None:
        pad = _align(self._size) - self._size
        if pad:
            self._chunks.append(b"\0" * pad)
            self._size += pad

    def add_array(self, array: np.ndarray) -> dict[str, Any]:
        """Store ``array`` as one aligned block; return ``{dtype, shape, block}``."""
        arr = _little_endian(array)
        self._pad()
        return {"dtype": _dtype_key(arr.dtype), "shape": list(arr.shape), "block": self._append(arr.tobytes())}

    def add_rows(self, array: np.ndarray, row_ends: Iterable[int]) -> dict[str, Any]:
        """Store ``array`` (rank-major: rows are rank components) as consecutive row segments.

        Segment ``j`` holds rows ``[row_ends[j-1], row_ends[j])``; each is its own hashed block and
        the segments are contiguous, so the first ``k`` segments are one contiguous prefix.
        Returns ``{dtype, shape, row_ends, blocks}``.
        """
        arr = _little_endian(array)
        ends = [int(e) for e in row_ends]
        if not ends or ends[-1] != arr.shape[0] or any(b <= a for a, b in zip([0] + ends, ends)):
            raise ValueError(f"row_ends {ends} must increase strictly and end at {arr.shape[0]}")
        self._pad()
        blocks, start = [], 0
        for end in ends:
            blocks.append(self._append(arr[start:end].tobytes()))
            start = end
        return {"dtype": _dtype_key(arr.dtype), "shape": list(arr.shape), "row_ends": ends, "blocks": blocks}

    def to_bytes(self, header: dict[str, Any]) -> bytes:
        """The complete artifact as bytes (used by :meth:`write` and golden tests)."""
        self._pad()
        header = dict(header)
        header["data_size"] = self._size
        packed = msgpack.packb(header, use_bin_type=True)
        minor = max([m for m, keys in MINOR_KEYS.items() if any(k in header for k in keys)], default=0)
        pre = PREAMBLE.pack(MAGIC, FORMAT_MAJOR, minor, len(packed), hashlib.sha256(packed).digest())
        head = pre + packed
        head += b"\0" * (_align(len(head)) - len(head))
        return head + b"".join(self._chunks)

    def write(self, path: str | os.PathLike, header: dict[str, Any]) -> int:
        """Write the artifact to ``path`` atomically; return its size in bytes.

        The bytes go to a temporary file in the same folder, are flushed to disk, then renamed over
        ``path``: an interrupted write never leaves a partial artifact behind.
        """
        data = self.to_bytes(header)
        write_atomic(path, data)
        return len(data)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _little_endian(array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array, order="C")  # ascontiguousarray would turn 0-d into 1-d
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    _dtype_key(arr.dtype)
    return arr


def _dtype_key(dtype: np.dtype) -> str:
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored; supported: {', '.join(DTYPES)}")


# --------------------------------------------------------------------------- reading


class ByteSource:
    """Random access to an artifact's bytes; the reader reads through one of these.

    Subclass it to read from a new transport (``stn_edge.device.remote.HttpSource`` reads over
    HTTP range requests). ``size`` is the artifact's length in bytes, ``name`` names it in errors.
    """

    name: str = "<source>"
    size: int = 0

    def read(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset``; :class:`ArtifactError` when they are not there."""
        raise NotImplementedError

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (sources override this to skip a copy)."""
        buf[:] = self.read(offset, len(buf))

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Hint: the ``(offset, size)`` spans will be read next. Remote sources fetch them in few requests."""

    def discard(self, offset: int, size: int) -> bool:
        """Forget any copy of ``[offset, offset + size)`` that failed its hash; True when reading again may help."""
        return False

    def close(self) -> None:
        """Release what the source holds open."""

    def _check_span(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ArtifactError(f"{self.name}: read of {size} bytes at {offset} is past the end ({self.size} bytes)")


class _Source(ByteSource):
    """A local artifact: a path, a binary file object, or bytes."""

    def __init__(self, source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO):
        self._lock = threading.Lock()
        self._owned = False
        self._direct = not hasattr(source, "read")  # we open the file (or buffer): readinto is safe
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._fh: BinaryIO = io.BytesIO(bytes(source))
            self.name = "<bytes>"
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if isinstance(source, str) and source.startswith(("http://", "https://")):
                raise ArtifactError(f"{source}: URLs are opened by Runtime.load (or stn_edge.device.remote.HttpSource)")
            if not path.is_file():
                raise ArtifactError(f"{path}: no such artifact file; check the path")
            self._fh = open(path, "rb")
            self._owned = True
            self.name = str(path)
        elif hasattr(source, "read") and hasattr(source, "seek"):
            self._fh = source
            self.name = getattr(source, "name", "<file>")
        else:
            raise ArtifactError(
                f"cannot read an artifact from {type(source).__name__}; pass a path, bytes or a binary file object"
            )
        self._fh.seek(0, io.SEEK_END)
        self.size = self._fh.tell()

    def read(self, offset: int, size: int) -> bytes:
        self._check_span(offset, size)
        with self._lock:
            self._fh.seek(offset)
            data = self._fh.read(size)
        if len(data) != size:
            raise ArtifactError(f"{self.name}: file is truncated (wanted {size} bytes at {offset})")
        return data

    def read_into(self, offset: int, buf: memoryview) -> None:
        if not self._direct:  # a caller's file object: use only the read/seek it promised
            buf[:] = self.read(offset, len(buf))
            return
        self._check_span(offset, len(buf))
        got = 0
        with self._lock:
            self._fh.seek(offset)
            while got < len(buf):  # raw files may return short reads
                n = self._fh.readinto(buf[got:])
                if not n:
                    raise ArtifactError(f"{self.name}: file is truncated (wanted {len(buf)} bytes at {offset})")
                got += n

    def close(self) -> None:
        if self._owned:
            self._fh.close()


@dataclass(frozen=True)
class ArrayRef:
    """Where one stored array lives: dtype, shape, and its hashed blocks (one, or one per row segment)."""

    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[tuple[int, int, bytes], ...]  # (offset, size, sha256)
    row_ends: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(b[1] for b in self.blocks)

    def prefix_bytes(self, segments: int) -> int:
        """Bytes held by the first ``segments`` row segments."""
        return sum(b[1] for b in self.blocks[:segments])


class ArtifactReader:
    """Opens a ``.stn`` artifact, validates all of its header, and reads blocks on demand.

    ``source`` is a path, bytes, a binary file object with ``seek``/``read``, or a
    :class:`ByteSource` (e.g. an HTTP source). Only the preamble and header are read when opening;
    array data is read by :meth:`read_array` and :meth:`read_rows`, which verify the SHA-256 of
    exactly the blocks they read. ``bytes_read`` counts every byte read from the source.

    Raises :class:`~stn_edge.errors.ArtifactError` for anything that is not a valid artifact, in
    time and memory bounded by the header's length (see ``docs/RELIABILITY.md``).
    """

    def __init__(self, source: str | os.PathLike | bytes | BinaryIO | ByteSource, *, verify: bool = True):
        self._src = source if isinstance(source, ByteSource) else _Source(source)
        self.verify = verify
        self.bytes_read = 0
        self._count_lock = threading.Lock()
        self.name = self._src.name
        try:
            self._open()
        except BaseException:
            self._src.close()
            raise

    def _read(self, offset: int, size: int) -> bytes:
        data = self._src.read(offset, size)
        with self._count_lock:
            self.bytes_read += size
        return data

    def _open(self) -> None:
        if self._src.size < PREAMBLE.size:
            raise ArtifactError(f"{self.name}: {self._src.size} bytes is too short to be a .stn artifact")
        magic, major, minor, header_len, header_hash = PREAMBLE.unpack(self._read(0, PREAMBLE.size))
        if magic != MAGIC:
            raise ArtifactError(f"{self.name}: not a .stn artifact (bad magic {magic[:8]!r})")
        if major > FORMAT_MAJOR:
            raise ArtifactError(
                f"{self.name}: format version {major}.{minor} is newer than this reader ({FORMAT_MAJOR}.{FORMAT_MINOR});"
                " upgrade stn-edge to read it"
            )
        if major < 1:
            raise ArtifactError(f"{self.name}: format version {major}.{minor} is not supported")
        self.version = (major, minor)
        if header_len > min(MAX_HEADER_BYTES, self._src.size - PREAMBLE.size):
            raise ArtifactError(f"{self.name}: header length {header_len} exceeds the file or the {MAX_HEADER_BYTES}-byte limit")
        packed = self._read(PREAMBLE.size, header_len)
        if hashlib.sha256(packed).digest() != header_hash:
            raise ArtifactError(f"{self.name}: header checksum mismatch; the file is corrupt, bake or download it again")
        header = _unpack_header(packed, self.name)
        self.data_start = _align(PREAMBLE.size + header_len)
        self.header = header
        _validate_header(header, self._src.size - self.data_start, self.name)
        self.data_size = int(header["data_size"])

    # ------------------------------------------------------------------ arrays

    def array_ref(self, ref: dict[str, Any]) -> ArrayRef:
        """Turn a validated header reference into an :class:`ArrayRef`."""
        blocks = ref["blocks"] if "blocks" in ref else [ref["block"]]
        return ArrayRef(
            dtype=ref["dtype"],
            shape=tuple(ref["shape"]),
            blocks=tuple((b["offset"], b["size"], b["sha256"]) for b in blocks),
            row_ends=tuple(ref.get("row_ends", ())),
        )

    def read_array(self, ref: dict[str, Any] | ArrayRef) -> np.ndarray:
        """Read a whole stored array (all its blocks), verified."""
        aref = ref if isinstance(ref, ArrayRef) else self.array_ref(ref)
        return self._read_blocks(aref.blocks, aref.dtype, aref.shape)

    def read_rows(self, ref: dict[str, Any] | ArrayRef, start: int, stop: int) -> np.ndarray:
        """Read row segments ``[start, stop)`` of a rank-major array; return those rows, verified."""
        aref = ref if isinstance(ref, ArrayRef) else self.array_ref(ref)
        if not (0 <= start <= stop <= len(aref.blocks)):
            raise ArtifactError(f"{self.name}: segments [{start}, {stop}) out of range (array has {len(aref.blocks)})")
        ends = (0,) + aref.row_ends
        rows = ends[stop] - ends[start]
        return self._read_blocks(aref.blocks[start:stop], aref.dtype, (rows,) + aref.shape[1:])

    def prefetch(self, refs: Iterable[tuple[dict[str, Any] | ArrayRef, int, int | None]]) -> int:
        """Tell the source which blocks come next: ``(ref, start, stop)`` row segments (``stop``
        None: the whole array). A remote source fetches them in a few coalesced range requests;
        a local one ignores the hint. Returns the bytes announced.
        """
        spans = []
        for ref, start, stop in refs:
            aref = ref if isinstance(ref, ArrayRef) else self.array_ref(ref)
            for offset, size, _ in aref.blocks[start:stop]:
                spans.append((self.data_start + offset, size))
        if spans:
            self._src.prefetch(spans)
        return sum(s for _, s in spans)

    def _read_blocks(self, blocks: tuple[tuple[int, int, bytes], ...], dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """The blocks' bytes as a new array of ``shape``, read straight into it (no second copy), verified."""
        # Fetch before allocating: over HTTP the sizes a header declares are bounded only by the size
        # the server claims, so a remote source must see the bytes arrive before the array exists
        # (a local source ignores the hint; its file holds every byte the header declares).
        self._src.prefetch([(self.data_start + b[0], b[1]) for b in blocks])
        out = np.empty(shape, dtype=DTYPES[dtype])
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if len(buf) != sum(b[1] for b in blocks):
            raise ArtifactError(f"{self.name}: blocks hold {sum(b[1] for b in blocks)} bytes, shape {shape} needs {len(buf)}")
        if not blocks:
            return out
        self._fetch_blocks(blocks, buf)
        if self.verify:
            bad = self._bad_block(blocks, buf)
            if bad is not None and self._src.discard(self.data_start + bad[0], bad[1]):
                self._fetch_blocks(blocks, buf)  # a cached or in-flight copy was bad: read once more
                bad = self._bad_block(blocks, buf)
            if bad is not None:
                raise ArtifactError(
                    f"{self.name}: block at offset {bad[0]} ({bad[1]} bytes) fails its SHA-256 check; the file is corrupt"
                )
        return out

    def _fetch_blocks(self, blocks: tuple[tuple[int, int, bytes], ...], buf: memoryview) -> None:
        first, last = blocks[0], blocks[-1]
        contiguous = all(b[0] == a[0] + a[1] for a, b in zip(blocks, blocks[1:]))
        spans = [(first[0], last[0] + last[1] - first[0])] if contiguous else [(o, s) for o, s, _ in blocks]
        pos = 0
        for offset, size in spans:
            self._src.read_into(self.data_start + offset, buf[pos : pos + size])
            pos += size
            with self._count_lock:
                self.bytes_read += size

    @staticmethod
    def _bad_block(blocks: tuple[tuple[int, int, bytes], ...], data: memoryview) -> tuple[int, int] | None:
        """``(offset, size)`` of the first block whose bytes do not match its SHA-256, or None."""
        view, pos = data, 0
        for offset, size, digest in blocks:
            if hashlib.sha256(view[pos : pos + size]).digest() != digest:
                return offset, size
            pos += size
        return None

    def close(self) -> None:
        """Close the underlying file when the reader opened it."""
        self._src.close()

    def __enter__(self) -> "ArtifactReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_artifact(source: str | os.PathLike | bytes | BinaryIO, *, verify: bool = True) -> ArtifactReader:
    """Open and validate an artifact; see :class:`ArtifactReader`."""
    return ArtifactReader(source, verify=verify)


# --------------------------------------------------------------------------- validation


class _TooManyObjects(Exception):
    pass


def _unpack_header(packed: bytes, name: str) -> Any:
    """msgpack-decode a header, refusing one that would unpack into far more objects than a real one.

    The hooks count every container and its elements as msgpack builds them, so a hostile header
    is stopped after at most one container (``max_array_len`` elements) past the cap.
    """
    max_containers = len(packed) // 8 + _HEADER_OBJECT_FLOOR
    max_elements = len(packed) // 2 + _HEADER_OBJECT_FLOOR
    counts = [0, 0]

    def count(obj: Any) -> Any:
        counts[0] += 1
        counts[1] += len(obj)
        if counts[0] > max_containers or counts[1] > max_elements:
            raise _TooManyObjects
        return obj

    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=True, use_list=True,
                               list_hook=count, object_hook=count, **_UNPACK_LIMITS)
    except _TooManyObjects:
        raise ArtifactError(
            f"{name}: header unpacks into more than {max_containers} containers or {max_elements} elements "
            f"for its {len(packed)} bytes; no baked header is this dense, the file is hostile or corrupt"
        ) from None
    except Exception as exc:  # msgpack raises several types (and RecursionError in its pure-Python build)
        raise ArtifactError(f"{name}: header is not valid msgpack ({_short(str(exc), 200)})") from None


def _validate_header(header: Any, data_avail: int, name: str) -> None:
    """Check every field the readers use before anything is used: types, offsets, sizes, shapes."""
    v = _Validator(name)
    v.map(header, "header")
    data_size = v.int(header.get("data_size"), "data_size")
    if data_size > data_avail:
        v.fail(f"data_size {data_size} exceeds the {data_avail} bytes present: the file is truncated")
    v.data_size = data_size
    _validate_model(v, v.map(header.get("model"), "model"))
    for tname, ref in v.names(header.get("tensors"), "tensors").items():
        v.array(ref, f"tensors[{_short(tname)}]")
    layers = v.list(header.get("layers"), "layers")
    for i, layer in enumerate(layers):
        _validate_layer(v, layer, f"layers[{i}]")
    for key in ("name", "node", "weight"):
        v.unique([layer[key] for layer in layers], f"layers[].{key}")
    nodes = {node["name"]: node for node in header["model"]["nodes"]}
    for i, layer in enumerate(layers):
        node = nodes.get(layer["node"])
        if node is None or not node["outputs"] or len(node["inputs"]) < 2 or layer["weight"] not in node["inputs"]:
            v.fail(f"layers[{i}] points at node {_short(layer['node'])}, which is missing or does not read weight "
                   f"{_short(layer['weight'])}")
    _check_references(v, header["model"], set(header["tensors"]) | {layer["weight"] for layer in layers})
    cal = header.get("calibration")
    if cal is not None:
        v.map(cal, "calibration")
        for key in ("inputs", "outputs"):
            declared = {info["name"] for info in header["model"][key]}
            for tname, ref in v.names(cal.get(key), f"calibration.{key}").items():
                if tname not in declared:
                    v.fail(f"calibration.{key} holds {_short(tname)}, which is not a model {key[:-1]}")
                v.array(ref, f"calibration.{key}[{_short(tname)}]")
    v.int(header.get("full_bytes"), "full_bytes")
    if header.get("value_shapes") is not None:
        _validate_value_shapes(v, header["value_shapes"])
    v.check_overlaps()


#: largest element count a recorded activation may declare (2**40 float32 = 4 TiB: beyond any device)
_MAX_VALUE_ELEMENTS = 1 << 40


def _validate_value_shapes(v: "_Validator", shapes: Any) -> None:
    """``value_shapes``: ``{value: [shape at batch 1, shape at batch 2, dtype]}`` (1.1, optional)."""
    for vname, rec in v.names(shapes, "value_shapes").items():
        where = f"value_shapes[{_short(vname)}]"
        rec = v.list(rec, where)
        if len(rec) != 3:
            v.fail(f"{where} must be [shape at batch 1, shape at batch 2, dtype], not {len(rec)} items")
        at = []  # the shapes at batch 1 and 2
        for k in (0, 1):
            dims = [v.int(d, f"{where}[{k}]") for d in v.list(rec[k], f"{where}[{k}]")]
            if len(dims) > 32 or math.prod(dims) > _MAX_VALUE_ELEMENTS:
                v.fail(f"{where}[{k}] declares shape {_short(dims)}: more than 32 axes or {_MAX_VALUE_ELEMENTS} elements")
            at.append(dims)
        if len(at[0]) != len(at[1]) or any(b < a for a, b in zip(*at)):
            v.fail(f"{where}: the shape at batch 2 {_short(at[1])} must have the axes of the shape at batch 1 "
                   f"{_short(at[0])}, none smaller")
        v.dtype(rec[2], f"{where}[2]")


def _validate_model(v: "_Validator", model: dict) -> None:
    for key in ("inputs", "outputs"):
        for i, info in enumerate(v.list(model.get(key), f"model.{key}")):
            v.map(info, f"model.{key}[{i}]")
            v.str(info.get("name"), f"model.{key}[{i}].name")
            v.dtype(info.get("dtype"), f"model.{key}[{i}].dtype")
            for d in v.list(info.get("shape"), f"model.{key}[{i}].shape"):
                if not isinstance(d, str):
                    v.int(d, f"model.{key}[{i}].shape")
    nodes = v.list(model.get("nodes"), "model.nodes")
    for i, node in enumerate(nodes):
        where = f"model.nodes[{i}]"
        v.map(node, where)
        v.str(node.get("op"), f"{where}.op")
        v.str(node.get("name"), f"{where}.name")
        v.str(node.get("domain", ""), f"{where}.domain")
        for key in ("inputs", "outputs"):
            for s in v.list(node.get(key), f"{where}.{key}"):
                v.str(s, f"{where}.{key}")
        for aname, value in v.names(node.get("attrs", {}), f"{where}.attrs").items():
            v.attr(value, f"{where}.attrs[{_short(aname)}]")
    v.unique([node["name"] for node in nodes], "model.nodes[].name")
    v.int(model.get("opset", 17), "model.opset")


def _check_references(v: "_Validator", model: dict, constants: set) -> None:
    """Every node input is a graph input, a constant (tensor or layer weight) or an earlier node's output."""
    known = {info["name"] for info in model["inputs"]} | constants | {""}
    for i, node in enumerate(model["nodes"]):
        missing = [name for name in node["inputs"] if name not in known]
        if missing:
            v.fail(f"model.nodes[{i}] ({_short(node['name'])}) reads {_short(missing)}, which no graph input, tensor, "
                   "layer weight or earlier node provides")
        known.update(node["outputs"])


def _validate_layer(v: "_Validator", layer: Any, where: str) -> None:
    v.map(layer, where)
    for key in ("name", "node", "weight", "kind", "family"):
        v.str(layer.get(key), f"{where}.{key}")
    v.str(layer.get("layout", ""), f"{where}.layout")
    v.array(layer.get("dense"), f"{where}.dense")
    ladder = v.map(layer.get("ladder"), f"{where}.ladder")
    ranks = [v.int(r, f"{where}.ladder.ranks") for r in v.list(ladder.get("ranks"), f"{where}.ladder.ranks")]
    costs = [v.int(b, f"{where}.ladder.bytes") for b in v.list(ladder.get("bytes"), f"{where}.ladder.bytes")]
    losses = v.list(ladder.get("loss"), f"{where}.ladder.loss")
    if not ranks or not (len(ranks) == len(costs) == len(losses)):
        v.fail(f"{where}.ladder: ranks, bytes and loss must be non-empty lists of equal length")
    if any(b <= a for a, b in zip(ranks, ranks[1:])) or ranks[0] < 1:
        v.fail(f"{where}.ladder.ranks must be positive and strictly increasing")
    if v.int(layer.get("max_rank", ranks[-1]), f"{where}.max_rank") < ranks[-1]:
        v.fail(f"{where}.max_rank {layer['max_rank']} is below its largest ladder rank {ranks[-1]}")
    for x in losses:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            v.fail(f"{where}.ladder.loss holds {_short(x)}; losses are finite numbers >= 0")
    factors = v.names(layer.get("factors"), f"{where}.factors")
    if not factors:
        v.fail(f"{where}.factors is empty")
    held = [0] * len(ranks)  # bytes of all factors' first j+1 segments, summed in one pass
    for fname, ref in factors.items():
        v.array(ref, f"{where}.factors[{_short(fname)}]", rows=True)
        if len(ref["row_ends"]) != len(ranks):
            v.fail(f"{where}.factors[{_short(fname)}] has {len(ref['row_ends'])} segments; the ladder has {len(ranks)} levels")
        total = 0
        for j, block in enumerate(ref["blocks"]):
            total += block["size"]
            held[j] += total
    _validate_family_fields(v, layer, ladder, factors, len(ranks), where)
    corr = layer.get("corrections")
    if corr is not None:  # one (2, out) row per level: per-channel output scale and shift at that level
        v.array(corr, f"{where}.corrections", rows=True)
        if corr["row_ends"] != list(range(1, len(ranks) + 1)) or len(corr["shape"]) != 3 or corr["shape"][1] != 2:
            v.fail(f"{where}.corrections must hold one (2, out) row per ladder level")
        for j, block in enumerate(corr["blocks"]):
            held[j] += block["size"]  # only level j's row is read for level j
    for j, (cost, have) in enumerate(zip(costs, held)):
        if have != cost:
            v.fail(f"{where}.ladder.bytes[{j}] = {cost} but its factor blocks hold {have} bytes")


_MAX_MODES = 8
#: how another node may read a tied (SVD) weight
_TIED_KINDS = ("linear", "conv", "embedding")


def _validate_family_fields(v: "_Validator", layer: dict, ladder: dict, factors: dict, levels: int, where: str) -> None:
    """The family-specific fields the runtime reads: factor names, ``structure``, ``ladder.bonds``, ``tied``."""
    family = layer["family"]
    known = families.get(family) if family in families.names() else None
    if known is not None:
        required, optional = set(known.factors), set(known.optional_factors)
        if not required <= set(factors) <= required | optional:
            v.fail(f"{where}.factors are {_short(sorted(factors))}; family {family} stores {sorted(required)}"
                   + (f" and optionally {sorted(optional)}" if optional else ""))
        if known.needs_structure and "structure" not in layer:
            v.fail(f"{where}.structure is missing; a {family} layer's lowering reads it")
    structure = v.names(layer.get("structure", {}), f"{where}.structure")
    bonds = ladder.get("bonds")
    n_bonds = 0
    if bonds is not None:  # per level, the rank of each bond; nested levels never shrink a bond
        rows = [[v.int(b, f"{where}.ladder.bonds") for b in v.list(level, f"{where}.ladder.bonds")]
                for level in v.list(bonds, f"{where}.ladder.bonds")]
        n_bonds = len(rows[0]) if rows else 0
        if len(rows) != levels or not 1 <= n_bonds <= _MAX_MODES or any(len(r) != n_bonds for r in rows):
            v.fail(f"{where}.ladder.bonds must hold one list of 1-{_MAX_MODES} bond ranks per level, all of one length")
        if any(b < 1 for b in rows[0]) or any(y < x for r0, r1 in zip(rows, rows[1:]) for x, y in zip(r0, r1)):
            v.fail(f"{where}.ladder.bonds must be positive and never decrease from one level to the next")
    for name, pair in v.names(structure.get("shells", {}), f"{where}.structure.shells").items():
        ij = [v.int(i, f"{where}.structure.shells") for i in v.list(pair, f"{where}.structure.shells")]
        if name not in factors or len(ij) != 2 or max(ij) >= n_bonds:
            v.fail(f"{where}.structure.shells[{_short(name)}] must name a factor and two of its "
                   f"{n_bonds} ladder bonds, found {_short(pair)}")
    if structure.get("first", "h") not in ("h", "w"):
        v.fail(f"{where}.structure.first must be 'h' or 'w', found {_short(structure['first'])}")
    for key in ("in_modes", "out_modes"):
        if key in structure:
            modes = [v.int(m, f"{where}.structure.{key}") for m in v.list(structure[key], f"{where}.structure.{key}")]
            if not 1 <= len(modes) <= _MAX_MODES or min(modes) < 1:
                v.fail(f"{where}.structure.{key} must be 1-{_MAX_MODES} positive sizes, found {_short(modes)}")
    if not 1 <= v.int(structure.get("input_rank", 2), f"{where}.structure.input_rank") <= _MAX_MODES:
        v.fail(f"{where}.structure.input_rank must be 1-{_MAX_MODES}, found {structure['input_rank']}")
    if family == "tt":
        _validate_tt(v, layer, structure, factors, where)
    for i, use in enumerate(v.list(layer.get("tied", []), f"{where}.tied")):
        v.map(use, f"{where}.tied[{i}]")
        v.str(use.get("node"), f"{where}.tied[{i}].node")
        if use.get("kind") not in _TIED_KINDS:
            v.fail(f"{where}.tied[{i}].kind must be one of {', '.join(_TIED_KINDS)}, found {_short(use.get('kind'))}")
        v.str(use.get("via", ""), f"{where}.tied[{i}].via")
        if not isinstance(use.get("swap"), bool):
            v.fail(f"{where}.tied[{i}].swap must be true or false")


def _validate_tt(v: "_Validator", layer: dict, structure: dict, factors: dict, where: str) -> None:
    """``tt``: d = 2 or 3 cores (a ``core`` exactly when d = 3, or for a conv), ``a (r, i_1, o_1)``, ``b (r, i_d, o_d)``."""
    ins, outs = structure.get("in_modes"), structure.get("out_modes")
    if ins is None or outs is None or len(ins) != len(outs) or len(ins) not in (2, 3):
        v.fail(f"{where}.structure: a tt layer needs in_modes and out_modes of 2 or 3 sizes each")
    d = len(ins)
    if ("core" in factors) != (d == 3 or layer["kind"] == "conv") or (layer["kind"] == "conv" and d != 2):
        v.fail(f"{where}: a tt {layer['kind']} layer of {d} cores stores {_short(sorted(factors))}")
    for name, i, o in (("a", ins[0], outs[0]), ("b", ins[-1], outs[-1])):
        if factors[name]["shape"][1:] != [i, o]:
            v.fail(f"{where}.factors[{name}] has shape {_short(factors[name]['shape'])}; its modes say (r, {i}, {o})")


class _Validator:
    def __init__(self, name: str):
        self.name = name
        self.data_size = 0
        self.spans: list[tuple[int, int, str]] = []

    def fail(self, msg: str) -> None:
        raise ArtifactError(f"{self.name}: invalid header: {msg}")

    def map(self, x: Any, where: str) -> dict:
        if not isinstance(x, dict):
            self.fail(f"{where} must be a map, found {type(x).__name__}")
        return x

    def list(self, x: Any, where: str) -> list:
        if not isinstance(x, list):
            self.fail(f"{where} must be a list, found {type(x).__name__}")
        return x

    def str(self, x: Any, where: str) -> str:
        if not isinstance(x, str):
            self.fail(f"{where} must be a string, found {type(x).__name__}")
        return x

    def names(self, x: Any, where: str) -> dict:
        """A map whose keys are strings (msgpack also allows bytes keys)."""
        for key in self.map(x, where):
            if not isinstance(key, str):
                self.fail(f"{where} has a key of type {type(key).__name__}; keys are strings")
        return x

    def unique(self, values: list, where: str) -> None:
        seen: set = set()
        for value in values:
            if value in seen:
                self.fail(f"{where}: {_short(value)} appears twice")
            seen.add(value)

    def int(self, x: Any, where: str) -> int:
        if not isinstance(x, int) or isinstance(x, bool) or x < 0 or x > 1 << 62:
            self.fail(f"{where} must be a non-negative integer, found {_short(x)}")
        return x

    def attr(self, x: Any, where: str, depth: int = 0) -> None:
        """A node attribute: a scalar, a string, bytes, a tensor map, or a (shallow) list of those."""
        if depth > _MAX_ATTR_DEPTH:
            self.fail(f"{where} nests deeper than {_MAX_ATTR_DEPTH} levels")
        if x is None or isinstance(x, (bool, int, float, str, bytes)):
            return
        if isinstance(x, list):
            for item in x:
                self.attr(item, where, depth + 1)
            return
        if not isinstance(x, dict) or set(x) != {"tensor"}:
            self.fail(f"{where} must be a number, string, bytes, list or {{'tensor': ...}}, found {type(x).__name__}")
        t = self.map(x["tensor"], f"{where}.tensor")
        dtype = self.dtype(t.get("dtype"), f"{where}.tensor.dtype")
        shape = [self.int(d, f"{where}.tensor.shape") for d in self.list(t.get("shape", []), f"{where}.tensor.shape")]
        data = t.get("data")
        if not isinstance(data, bytes) or len(shape) > 8 or math.prod(shape) * DTYPES[dtype].itemsize != len(data):
            self.fail(f"{where}.tensor: data must be bytes matching dtype {dtype} and shape {_short(shape)}")

    def dtype(self, x: Any, where: str) -> str:
        if not isinstance(x, str) or x not in DTYPES:
            self.fail(f"{where}: unknown dtype {_short(x)}; known: {', '.join(DTYPES)}")
        return x

    def block(self, b: Any, where: str) -> int:
        self.map(b, where)
        off = self.int(b.get("offset"), f"{where}.offset")
        size = self.int(b.get("size"), f"{where}.size")
        digest = b.get("sha256")
        if not isinstance(digest, bytes) or len(digest) != 32:
            self.fail(f"{where}.sha256 must be 32 bytes")
        if off + size > self.data_size:
            self.fail(f"{where} spans [{off}, {off + size}) past the data section ({self.data_size} bytes)")
        self.spans.append((off, size, where))
        return size

    def array(self, ref: Any, where: str, rows: bool = False) -> None:
        self.map(ref, where)
        dtype = self.dtype(ref.get("dtype"), f"{where}.dtype")
        shape = [self.int(d, f"{where}.shape") for d in self.list(ref.get("shape"), f"{where}.shape")]
        if len(shape) > 8:
            self.fail(f"{where}.shape has {len(shape)} dims; at most 8 are allowed")
        count = 1
        for d in shape:
            count *= d
        expected = count * DTYPES[dtype].itemsize
        if rows:
            ends = [self.int(e, f"{where}.row_ends") for e in self.list(ref.get("row_ends"), f"{where}.row_ends")]
            blocks = self.list(ref.get("blocks"), f"{where}.blocks")
            if not shape or not ends or len(ends) != len(blocks) or ends[-1] != shape[0]:
                self.fail(f"{where}: row segments do not cover its {shape[:1]} rows")
            if any(b <= a for a, b in zip([0] + ends, ends)):
                self.fail(f"{where}.row_ends must increase strictly")
            row_bytes = expected // shape[0] if shape[0] else 0
            start, prev_end = 0, None
            for i, (end, b) in enumerate(zip(ends, blocks)):
                size = self.block(b, f"{where}.blocks[{i}]")
                if size != (end - start) * row_bytes:
                    self.fail(f"{where}.blocks[{i}] holds {size} bytes, rows {start}:{end} need {(end - start) * row_bytes}")
                if prev_end is not None and b["offset"] != prev_end:
                    self.fail(f"{where}.blocks[{i}] is not contiguous with the previous segment")
                prev_end = b["offset"] + size
                start = end
        else:
            if "blocks" in ref or "row_ends" in ref:
                self.fail(f"{where} is a single-block array; it must not carry 'blocks' or 'row_ends'")
            size = self.block(ref.get("block"), f"{where}.block")
            if size != expected:
                self.fail(f"{where}: block holds {size} bytes but dtype {dtype} and shape {shape} need {expected}")

    def check_overlaps(self) -> None:
        spans = sorted(s for s in self.spans if s[1] > 0)
        for (o1, s1, w1), (o2, _, w2) in zip(spans, spans[1:]):
            if o2 < o1 + s1:
                self.fail(f"blocks overlap: {w1} and {w2}")
