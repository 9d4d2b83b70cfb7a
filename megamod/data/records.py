"""Data files record by record: a JSON list (LLaVA's `llava_v1_5_mix665k.json` style) or JSONL (one object per line).

A file is indexed once (the byte span and line number of every record) and records are parsed on access from the
file, so a corpus of millions of samples costs a few arrays of memory, and DataLoader workers share nothing mutable.
The index is built in one streaming pass over fixed-size chunks (a JSON list's top-level element boundaries are
found with numpy from its quotes, backslashes, brackets and commas; the file is never held in memory, decoded or
not), and a file of CACHE_MIN_BYTES or more keeps it beside itself (`<file>.megamod-index.npz`, keyed by size and
mtime; see `cached_arrays`), so that the ranks of a node and later runs read it instead of scanning again.
A broken JSON list cannot be resynchronised and is a DataError naming file:line:column (when the list's structure
is broken, at indexing; when one element is not valid JSON, when that element is read, which the data sets do for
every record at start-up); a malformed JSONL line is a bad sample of its own (SampleError) and the other lines stay
usable.
"""
from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import json
import logging
import os

import numpy as np

from megamod.data.templates import SampleError

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # bytes scanned at a time
CACHE_MIN_BYTES = 8 << 20  # smaller files are indexed in well under a second: no cache files beside them
CACHE_VERSION = 1
CACHE_DIR_ENV = "MEGAMOD_DATA_CACHE"  # a folder for the caches of files whose folder is read-only; "off": none
_WS = b" \t\r\n"


class DataError(ValueError):
    """A data file that cannot be used at all (missing, unreadable, broken JSON list, every sample bad, ...)."""


def _where(path: str, pos: int) -> str:
    """"line:column" of byte `pos` (column in characters, 1-based), streamed (error paths only)."""
    line, last_nl, done = 1, -1, 0
    with open(path, "rb") as f:
        while done < pos and (chunk := f.read(min(CHUNK_BYTES, pos - done))):
            n = chunk.count(b"\n")
            if n:
                line += n
                last_nl = done + chunk.rfind(b"\n")
            done += len(chunk)
        f.seek(last_nl + 1)
        head = f.read(pos - last_nl - 1)
    return f"{line}:{len(head.decode('utf-8', errors='replace')) + 1}"


def _list_error(path: str, pos: int, msg: str):
    raise DataError(f"{path}:{_where(path, pos)}: malformed JSON list: {msg}")


def _utf8_error(path: str, pos: int, e: UnicodeDecodeError):
    raise DataError(f"{path}:{_where(path, pos + e.start).split(':')[0]}: not UTF-8 ({e.reason})") from None


def _check_element(path: str, raw: bytes, start: int):
    """DataError naming file:line:column if `raw` (one element of the list at byte `start`) is not one JSON value."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _utf8_error(path, start, e)
    try:
        _, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip(" \t\r\n")))
    except json.JSONDecodeError as e:
        _list_error(path, start + len(text[:e.pos].encode("utf-8")), e.msg)
    if end < len(text.rstrip(" \t\r\n")):
        end = len(text) - len(text[end:].lstrip(" \t\r\n"))
        _list_error(path, start + len(text[:end].encode("utf-8")), "expected ',' or ']' between elements")


def _json_list_index(path: str, f):
    """Byte spans and first lines of the elements of a JSON list, streamed over chunks: a byte is in a string after
    an odd number of unescaped quotes; outside strings, `[{` / `]}` move the depth and a comma at depth 1 ends an
    element. Each element's JSON is checked when it is read (RecordFile.read); the list's structure (separators,
    the closing bracket, nothing after it) here."""
    starts, ends, lines = array.array("q"), array.array("q"), array.array("q")
    in_string, escaped, depth = False, False, 0  # state at the start of the next chunk
    base, newlines = 0, 0  # bytes and newlines before the chunk
    seg_pos, seg_line, seg = None, 0, []  # the element being read: its separator's end, line there, bytes so far
    closed = None  # byte after the list's ']'

    def element(end_pos: int, last: bool, tail: bytes):
        """The bytes between the separator before (at seg_pos) and end_pos are one element."""
        nonlocal seg
        raw = b"".join(seg) + tail if seg else tail
        seg = []
        body = raw.lstrip(_WS)
        if not body:
            if last:  # "[]", or "[1,]" (tolerated, as the parser this replaced did)
                return
            _list_error(path, end_pos, "Expecting value")
        lead = len(raw) - len(body)
        start = seg_pos + lead
        starts.append(start)
        ends.append(start + len(body.rstrip(_WS)))
        lines.append(seg_line + raw.count(b"\n", 0, lead))

    while closed is None and (chunk := f.read(CHUNK_BYTES)):
        a = np.frombuffer(chunk, dtype=np.uint8)
        nl = np.flatnonzero(a == 10)
        # quotes escaped by an odd run of backslashes (a run may continue from the previous chunk)
        bs = np.flatnonzero(a == 92)
        esc_at = []
        if len(bs):
            breaks = np.flatnonzero(np.diff(bs) != 1)
            run_start = np.concatenate(([bs[0]], bs[breaks + 1]))
            run_end = np.concatenate((bs[breaks], [bs[-1]]))
            run_len = run_end - run_start + 1
            if escaped and run_start[0] == 0:
                run_len[0] -= 1  # its first backslash is escaped by the previous chunk's
            esc_at = run_end[run_len % 2 == 1] + 1
        next_escaped = len(esc_at) > 0 and esc_at[-1] == len(a)
        q = np.flatnonzero(a == 34)
        if len(q):
            drop = np.isin(q, esc_at)
            if escaped and q[0] == 0:
                drop[0] = True
            q = q[~drop]
        a32 = a | 32  # '[' (91) -> '{' (123), ']' (93) -> '}' (125); no other byte maps to either
        s = np.flatnonzero((a == 44) | (a32 == 123) | (a32 == 125))
        del a32
        outside = ((np.searchsorted(q, s) + in_string) % 2) == 0
        s = s[outside]
        c = a[s]
        delta = np.where((c | 32) == 123, 1, np.where((c | 32) == 125, -1, 0)).astype(np.int64)
        after = depth + np.cumsum(delta)
        before = after - delta
        mark = np.flatnonzero(((c == 44) & (before == 1)) | ((delta != 0) & (before <= 1) & (after <= 1)))
        pos = 0  # bytes of this chunk consumed into elements
        for k in mark.tolist():
            p = int(s[k])
            if before[k] == 0 and after[k] == 1:  # the list's '['
                seg_pos, seg_line, pos = base + p + 1, newlines + int(np.searchsorted(nl, p)) + 1, p + 1
                continue
            if seg_pos is None:  # cannot happen: the first non-blank byte is '['
                _list_error(path, base + p, "expected '['")
            if delta[k] == 0 or (before[k] == 1 and after[k] == 0):  # ',' or the list's ']'
                if delta[k] != 0 and a[p] != 93:
                    _list_error(path, base + p, "expected ',' or ']' between elements")
                element(base + p, delta[k] != 0, chunk[pos:p])
                seg_pos, seg_line, pos = base + p + 1, newlines + int(np.searchsorted(nl, p)) + 1, p + 1
                if delta[k] != 0:
                    closed = base + p + 1
                    break
        if closed is None:
            if seg_pos is not None:
                seg.append(chunk[pos:])
            depth, in_string = int(after[-1]) if len(after) else depth, (in_string + len(q)) % 2 == 1
            escaped = bool(next_escaped)
        base += len(chunk)
        newlines += len(nl)
    if closed is None:
        if seg_pos is not None and b"".join(seg).strip(_WS):
            _check_element(path, b"".join(seg), seg_pos)  # a cut-off element fails here as the JSON parser says
        _list_error(path, base, "unterminated list (missing ']')")
    f.seek(closed)
    pos = closed
    while chunk := f.read(CHUNK_BYTES):
        rest = chunk.lstrip(_WS)
        if rest:
            _list_error(path, pos + len(chunk) - len(rest), "extra data after the list")
        pos += len(chunk)
    return starts, ends, lines


def _jsonl_index(f):
    """Byte spans and line numbers of the non-blank lines, streamed (the file may be far larger than memory)."""
    starts, ends, lines = array.array("q"), array.array("q"), array.array("q")
    pos = 0
    for number, raw in enumerate(f, 1):
        if raw.strip():
            content = raw.rstrip(b"\r\n")
            starts.append(pos)
            ends.append(pos + len(content))
            lines.append(number)
        pos += len(raw)
    return starts, ends, lines


def _cache_path(path: str, name: str) -> str | None:
    """Where `path`'s cache `name` lives: beside it, else in $MEGAMOD_DATA_CACHE or ~/.cache/megamod/data; None: off."""
    setting = os.environ.get(CACHE_DIR_ENV)
    if setting == "off":
        return None
    base = f"{os.path.basename(path)}.megamod-{name}.npz"
    folder = os.path.dirname(os.path.abspath(path))
    if not setting and os.access(folder, os.W_OK):
        return os.path.join(folder, base)
    other = setting or os.path.join(os.path.expanduser("~"), ".cache", "megamod", "data")
    try:
        os.makedirs(other, exist_ok=True)
    except OSError:
        return None
    if not os.access(other, os.W_OK):
        return None
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    return os.path.join(other, f"{digest}-{base}")


def _key(st: os.stat_result) -> np.ndarray:
    return np.asarray([CACHE_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _load(cache: str, key: np.ndarray) -> dict | None:
    try:
        with np.load(cache) as z:
            if z["key"].tolist() != key.tolist():
                return None
            return {k: z[k] for k in z.files if k != "key"}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def cached_arrays(path: str, name: str, build, min_bytes: int | None = None) -> dict:
    """`build()` (a dict of numpy arrays computed from the file at `path`), kept in a cache file keyed by the
    file's size and mtime, so that it is computed once per file: the first process to need it takes a lock on the
    cache's folder and builds it (written to a temporary name, then renamed), the others (the ranks of a node)
    wait for the lock and read it. Files under `min_bytes` (default CACHE_MIN_BYTES) are not cached; without a
    writable folder (or a folder that cannot be locked) each process builds its own or the first rename wins."""
    st = os.stat(path)
    if st.st_size < (CACHE_MIN_BYTES if min_bytes is None else min_bytes):
        return build()
    cache = _cache_path(path, name)
    if cache is None:
        log.info("no writable cache folder for %s (set %s): its %s is rebuilt each run", path, CACHE_DIR_ENV, name)
        return build()
    key = _key(st)
    if (got := _load(cache, key)) is not None:
        return got
    lock = None
    try:
        lock = os.open(os.path.dirname(cache), os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:  # e.g. NFS without flock: build anyway, the rename keeps the cache whole
        log.info("cannot lock %s (%s); building %s without the lock", os.path.dirname(cache), e, name)
    try:
        if lock is not None and (got := _load(cache, key)) is not None:
            return got
        arrays = build()
        if _key(os.stat(path)).tolist() == key.tolist():  # unchanged while we read it
            tmp = f"{cache}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as out:
                    np.savez(out, key=key, **arrays)
                os.replace(tmp, cache)
                log.info("cached the %s of %s in %s", name, path, cache)
            except OSError as e:
                log.info("cannot write %s (%s): its %s is rebuilt each run", cache, e, name)
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return arrays
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


class RecordFile:
    """The records of one JSON-list or JSONL file: `len`, `read(i)` (a dict), `location(i)` ("path:line")."""

    def __init__(self, path: str):
        self.path, self._fd, self._pid = path, None, None
        try:
            with open(path, "rb") as f:
                head = b""
                while not head and (chunk := f.read(1 << 16)):
                    head = chunk.lstrip()[:1]
            self.format = "json" if head == b"[" else "jsonl"
            index = cached_arrays(path, "index", self._build_index)
        except OSError as e:
            raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
        if not len(index["starts"]):
            raise DataError(f"{path}: no records")
        self._starts, self._ends, self._lines = index["starts"], index["ends"], index["lines"]

    def _build_index(self) -> dict:
        with open(self.path, "rb") as f:
            starts, ends, lines = _json_list_index(self.path, f) if self.format == "json" else _jsonl_index(f)
        return {"starts": np.frombuffer(starts, dtype=np.int64), "ends": np.frombuffer(ends, dtype=np.int64),
                "lines": np.frombuffer(lines, dtype=np.int64)}

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self):  # a DataLoader worker opens its own descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}

    def line(self, i: int) -> int:
        return int(self._lines[i])

    def location(self, i: int) -> str:
        return f"{self.path}:{self.line(i)}"

    def read(self, i: int) -> dict:
        """Record i parsed; SampleError if it is not a JSON object (a malformed JSONL line), DataError naming
        file:line:column if an element of a JSON list is not valid JSON (the whole list is unusable)."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self._starts[i]), int(self._ends[i])
        raw = os.pread(self._fd, end - start, start)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if self.format == "json":
                _check_element(self.path, raw, start)
            if isinstance(e, UnicodeDecodeError):
                raise SampleError(f"not UTF-8: {e.reason}") from None
            raise SampleError(f"malformed JSON line: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise SampleError(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
