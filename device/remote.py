"""Artifacts over HTTP: read the header and only the planned byte ranges, with an optional cache.

:class:`HttpSource` is a :class:`~stn_edge.format.ByteSource`: the reader asks it for byte spans and
checks every block's SHA-256 as it does for a local file. ``Runtime.load("https://host/model.stn")``
uses one; build it yourself for the options::

    src = HttpSource("https://host/model.stn", cache_dir="~/.cache/stn", full_download=True)
    rt = Runtime.load(src, mem_limit="auto")

How it talks to the server (standard library only):

- The first request asks for the first 64 KiB (``Range: bytes=0-65535``); a ``206`` reply with a
  ``Content-Range`` header gives the artifact's size and usually the whole header.
- When the runtime plans, it announces the blocks it will read (:meth:`HttpSource.prefetch`); spans
  closer than ``max_gap`` bytes are merged and fetched in a few range requests, ``workers`` at a time.
- A ``200`` reply to a range request means the server ignores ranges: that is an
  :class:`ArtifactError` saying so, unless ``full_download=True``, which streams the whole artifact to
  ``cache_dir`` (or to an anonymous temporary file) and reads it from there.
- With ``cache_dir``, fetched ranges are kept as files (written atomically) under a folder named by
  the header's SHA-256, which names the artifact's content: a changed artifact never reads a stale
  cache. The header itself is fetched on every open, so the cache is always checked against the
  server. A cached range that fails its hash is deleted and fetched again.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from stn_edge.errors import ArtifactError
from stn_edge.format import PREAMBLE, ByteSource, _Source, write_atomic

#: bytes asked for by the first request: the preamble and, for most models, the whole header
HEAD_BYTES = 64 * 1024
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_CHUNK = 1 << 20


class _ConnectionCut(ArtifactError):
    """The server sent fewer bytes than it promised; worth another try."""


def is_url(source: object) -> bool:
    """True for ``http://`` and ``https://`` strings."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


class HttpSource(ByteSource):
    """Random access to an artifact on an HTTP(S) server, by range requests.

    Parameters
    ----------
    url : ``http://`` or ``https://`` address of a ``.stn`` artifact.
    cache_dir : folder that keeps fetched ranges between loads; None keeps nothing.
    full_download : when the server ignores range requests, download the whole artifact instead of
        raising :class:`ArtifactError`.
    timeout : seconds to wait for the server on each request.
    retries : further attempts after a failed request (network errors and 5xx), with back-off.
    max_gap : announced spans closer than this many bytes are fetched in one request.
    workers : range requests in flight at once while prefetching.
    headers : extra request headers (e.g. ``{"Authorization": "Bearer ..."}``).

    ``bytes_fetched`` counts body bytes received from the server; ``requests`` counts requests.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_dir: str | os.PathLike | None = None,
        full_download: bool = False,
        timeout: float = 30.0,
        retries: int = 2,
        max_gap: int = 64 * 1024,
        workers: int = 4,
        headers: dict[str, str] | None = None,
    ):
        if not is_url(url):
            raise ArtifactError(f"{url!r} is not an http:// or https:// address")
        self.name = self.url = url
        self.timeout = timeout
        self.retries = retries
        self.max_gap = max_gap
        self.workers = max(1, workers)
        self.headers = dict(headers or {})
        self.bytes_fetched = 0
        self.requests = 0
        self._cache_root = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._cache: Path | None = None
        self._cached: dict[tuple[int, int], Path] = {}
        self._spans: dict[int, list] = {}  # prefetched: start -> [bytes, announced bytes not read yet]
        self._lock = threading.Lock()
        self._local: _Source | None = None  # set when the whole artifact was downloaded
        self._etag: str | None = None
        self._head = self._open(full_download)

    # ------------------------------------------------------------------ opening

    def _open(self, full_download: bool) -> bytes:
        status, headers, stream = self._request(0, HEAD_BYTES - 1)
        try:
            if status == 200:
                if not full_download:
                    raise ArtifactError(
                        f"{self.url}: the server ignores HTTP range requests (it answered 200 to 'Range: bytes=0-"
                        f"{HEAD_BYTES - 1}'), so only the whole artifact could be fetched. Serve it from a server "
                        "with range support, or pass HttpSource(url, full_download=True) to download it all"
                    )
                self._download(stream)
                return b""
            self.size = self._parse_range(headers, 0, HEAD_BYTES - 1, total_known=False)
            head = self._read_body(stream, min(HEAD_BYTES, self.size))
        finally:
            stream.close()
        etag = headers.get("ETag") or ""
        self._etag = etag if etag.startswith('"') else None  # a strong validator: If-Range needs one
        self._open_cache(head)
        return head

    def _open_cache(self, head: bytes) -> None:
        if self._cache_root is None or len(head) < PREAMBLE.size:
            return  # too short to be an artifact: the reader says so
        self._cache = self._cache_root / PREAMBLE.unpack(head[: PREAMBLE.size])[4].hex()
        if self._cache.is_dir():
            for path in self._cache.iterdir():
                m = re.fullmatch(r"(\d+)-(\d+)\.bin", path.name)
                if m and path.stat().st_size == int(m.group(2)) - int(m.group(1)):
                    self._cached[(int(m.group(1)), int(m.group(2)))] = path

    def _download(self, stream: BinaryIO) -> None:
        """Stream a 200 reply to disk: into the cache when there is one, else an anonymous temp file."""
        first = self._read_body(stream, PREAMBLE.size, exact=False)
        if self._cache_root is not None and len(first) == PREAMBLE.size:
            folder = self._cache_root / PREAMBLE.unpack(first)[4].hex()
            whole = folder / "artifact.stn"
            if not whole.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".artifact.", suffix=".tmp", dir=folder)
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(first)
                        self._copy_body(stream, fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, whole)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
            self._local = _Source(whole)
        else:
            fh = tempfile.TemporaryFile()
            fh.write(first)
            self._copy_body(stream, fh)
            self._local = _Source(fh)
            self._local._owned = True  # the temporary file dies with the source
        self.size = self._local.size

    def _copy_body(self, stream: BinaryIO, fh: BinaryIO) -> None:
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                return
            fh.write(chunk)
            with self._lock:
                self.bytes_fetched += len(chunk)

    # ------------------------------------------------------------------ HTTP

    def _request(self, start: int, stop: int) -> tuple[int, Message, BinaryIO]:
        """Send ``Range: bytes=start-stop`` (inclusive); return status, headers and the open body."""
        headers = dict(self.headers, Range=f"bytes={start}-{stop}")
        if self._etag:
            headers["If-Range"] = self._etag
        req = urllib.request.Request(self.url, headers=headers)
        delay = 0.2
        for attempt in range(self.retries + 1):
            with self._lock:
                self.requests += 1
            try:
                resp = urllib.request.urlopen(req, timeout=self.timeout)
                return resp.status, resp.headers, resp  # headers: case-insensitive lookups
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code == 416:
                    raise ArtifactError(f"{self.url}: the server has no bytes {start}-{stop} (HTTP 416); "
                                        "the artifact is empty or shorter than expected") from None
                if exc.code < 500 or attempt == self.retries:
                    raise ArtifactError(f"{self.url}: HTTP {exc.code} {exc.reason} for bytes {start}-{stop}") from None
            except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise ArtifactError(f"{self.url}: cannot fetch bytes {start}-{stop} ({reason}) "
                                        f"after {self.retries + 1} attempts") from None
            time.sleep(delay)
            delay *= 2.5
        raise AssertionError("unreachable")

    def _parse_range(self, headers: Message, start: int, stop: int, total_known: bool = True) -> int:
        """Check a 206 reply's ``Content-Range`` against the request; return the artifact's size."""
        value = headers.get("Content-Range") or ""
        m = _CONTENT_RANGE.match(value)
        if m is None or m.group(3) == "*":
            raise ArtifactError(f"{self.url}: range reply without a usable Content-Range ({value!r})")
        first, last, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if total_known and total != self.size:
            raise ArtifactError(f"{self.url}: the artifact changed on the server while loading "
                                f"({self.size} bytes, now {total}); load it again")
        if first != start or last < first or last > min(stop, total - 1):
            raise ArtifactError(f"{self.url}: asked for bytes {start}-{stop}, the server sent {value!r}")
        return total

    def _read_body(self, stream: BinaryIO, size: int, exact: bool = True) -> bytes:
        parts, got = [], 0
        while got < size:
            try:
                chunk = stream.read(min(size - got, _CHUNK))
            except (OSError, http.client.HTTPException):  # reset, timeout, IncompleteRead
                chunk = b""
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        with self._lock:
            self.bytes_fetched += got
        if exact and got != size:
            raise _ConnectionCut(f"{self.url}: the server sent {got} of {size} bytes; the connection was cut")
        return b"".join(parts)

    def _fetch(self, start: int, size: int) -> bytes:
        """Bytes ``[start, start + size)`` by one range request, stored in the cache when there is one."""
        stop = start + size - 1
        for attempt in range(self.retries + 1):
            status, headers, stream = self._request(start, stop)
            try:
                if status != 206:
                    raise ArtifactError(f"{self.url}: the server answered {status} to a range request for bytes "
                                        f"{start}-{stop}; it stopped honouring ranges or the artifact changed")
                self._parse_range(headers, start, stop)
                data = self._read_body(stream, size)
                break
            except _ConnectionCut:
                if attempt == self.retries:
                    raise
            finally:
                stream.close()
        if self._cache is not None:
            path = self._cache / f"{start}-{start + size}.bin"
            try:
                write_atomic(path, data)
            except OSError:
                pass  # a full or read-only cache slows later loads; it must not fail this one
            else:
                with self._lock:
                    self._cached[(start, start + size)] = path
        return data

    # ------------------------------------------------------------------ ByteSource

    def read(self, offset: int, size: int) -> bytes:
        self._check_span(offset, size)
        if self._local is not None:
            return self._local.read(offset, size)
        if offset + size <= len(self._head):
            return self._head[offset : offset + size]
        found = self._from_spans(offset, size)
        if found is None:
            found = self._from_cache(offset, size)
        return bytes(found) if found is not None else self._fetch(offset, size)

    def read_into(self, offset: int, buf: memoryview) -> None:
        if self._local is not None:
            self._local.read_into(offset, buf)
            return
        self._check_span(offset, len(buf))
        found = self._from_spans(offset, len(buf))
        # from a prefetched span: one copy, straight into the caller's array
        buf[:] = found if found is not None else self.read(offset, len(buf))

    def _from_spans(self, offset: int, size: int) -> memoryview | None:
        """The bytes from a prefetched span; a span is dropped once all its announced bytes were read."""
        with self._lock:
            for start, entry in self._spans.items():
                data, unread = entry
                if start <= offset and offset + size <= start + len(data):
                    entry[1] = unread - size
                    if entry[1] <= 0:
                        del self._spans[start]
                    return memoryview(data)[offset - start : offset - start + size]
        return None

    def _from_cache(self, offset: int, size: int) -> bytes | None:
        with self._lock:
            hit = next(((a, b, p) for (a, b), p in self._cached.items() if a <= offset and offset + size <= b), None)
        if hit is None:
            return None
        start, _, path = hit
        try:
            with open(path, "rb") as fh:
                fh.seek(offset - start)
                data = fh.read(size)
        except OSError:
            data = b""
        if len(data) != size:
            self._forget(path)
            return None
        return data

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Fetch the announced ``(offset, size)`` spans not held yet, merged, ``workers`` at a time."""
        if self._local is not None:
            return
        wanted = sorted((o, s) for o, s in spans if s > 0 and o + s > len(self._head) and self._covered(o, s) is None)
        merged: list[list[int]] = []  # [start, end, announced bytes]
        for offset, size in wanted:
            if merged and offset <= merged[-1][1] + self.max_gap:
                merged[-1][1] = max(merged[-1][1], offset + size)
                merged[-1][2] += size
            else:
                merged.append([offset, offset + size, size])
        if not merged:
            return
        fetch = lambda r: (r, self._fetch(r[0], r[1] - r[0]))  # noqa: E731
        if len(merged) == 1 or self.workers == 1:  # no thread to start for one request at a time
            results = [fetch(r) for r in merged]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(merged))) as pool:
                results = list(pool.map(fetch, merged))
        with self._lock:
            for (start, _, announced), data in results:
                self._spans[start] = [data, announced]

    def _covered(self, offset: int, size: int) -> object | None:
        with self._lock:
            for (a, b) in self._cached:
                if a <= offset and offset + size <= b:
                    return a
            for start, (data, _) in self._spans.items():
                if start <= offset and offset + size <= start + len(data):
                    return start
        return None

    def discard(self, offset: int, size: int) -> bool:
        """Drop prefetched and cached copies overlapping the span; True: reading again refetches it."""
        if self._local is not None:
            return False
        end = offset + size
        with self._lock:
            for start in [s for s, (data, _) in self._spans.items() if s < end and offset < s + len(data)]:
                del self._spans[start]
            stale = [p for (a, b), p in self._cached.items() if a < end and offset < b]
        for path in stale:
            self._forget(path)
        return True

    def _forget(self, path: Path) -> None:
        with self._lock:
            for key in [k for k, p in self._cached.items() if p == path]:
                del self._cached[key]
        try:
            path.unlink()
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._spans.clear()
        if self._local is not None:
            self._local.close()


def clear_cache(cache_dir: str | os.PathLike) -> None:
    """Delete every artifact folder under ``cache_dir`` (the folder itself stays)."""
    root = Path(cache_dir).expanduser()
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and re.fullmatch(r"[0-9a-f]{64}", child.name):
                shutil.rmtree(child, ignore_errors=True)
