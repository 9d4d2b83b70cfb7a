"""Data files record by record: a JSON list (LLaVA's `llava_v1_5_mix665k.json` style) or JSONL (one object per line).

A file is indexed once (the byte span and line number of every record) and records are parsed on access from the
file, so a corpus of millions of samples costs a few arrays of memory, and DataLoader workers share nothing mutable.
A broken JSON list cannot be resynchronised and is a DataError naming file:line:column; a malformed JSONL line is a
bad sample of its own (SampleError) and the other lines stay usable.
"""
from __future__ import annotations

import json
import os

import numpy as np

from megamod.data.templates import SampleError


class DataError(ValueError):
    """A data file that cannot be used at all (missing, unreadable, broken JSON list, every sample bad, ...)."""


def _json_list_index(path: str, blob: bytes):
    """Byte spans and first lines of the elements of a JSON list."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason})") from None
    decoder = json.JSONDecoder()
    ascii_only = len(text) == len(blob)
    char_starts, starts, ends = [], [], []
    char_base = byte_base = 0

    def to_byte(c: int) -> int:  # char offset -> byte offset, walking forward only (O(file) in total)
        nonlocal char_base, byte_base
        if ascii_only:
            return c
        byte_base += len(text[char_base:c].encode("utf-8"))
        char_base = c
        return byte_base

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, msg: str):
        line, column = text.count("\n", 0, p) + 1, p - text.rfind("\n", 0, p)
        raise DataError(f"{path}:{line}:{column}: malformed JSON list: {msg}")

    pos = skip_ws(text.index("[") + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        char_starts.append(pos)
        starts.append(to_byte(pos))
        ends.append(to_byte(end))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] != "]":
            fail(pos, "expected ',' or ']' between elements")
    if pos >= len(text):
        fail(pos, "unterminated list (missing ']')")
    if text[pos + 1:].strip():
        fail(skip_ws(pos + 1), "extra data after the list")
    lines, prev, count = [], 0, 1  # newlines counted between consecutive records only
    for p in char_starts:
        count += text.count("\n", prev, p)
        lines.append(count)
        prev = p
    return starts, ends, lines


def _jsonl_index(f):
    """Byte spans and line numbers of the non-blank lines, streamed (the file may be far larger than memory)."""
    starts, ends, lines = [], [], []
    pos = 0
    for number, raw in enumerate(f, 1):
        if raw.strip():
            content = raw.rstrip(b"\r\n")
            starts.append(pos)
            ends.append(pos + len(content))
            lines.append(number)
        pos += len(raw)
    return starts, ends, lines


class RecordFile:
    """The records of one JSON-list or JSONL file: `len`, `read(i)` (a dict), `location(i)` ("path:line")."""

    def __init__(self, path: str):
        self.path, self._fd, self._pid = path, None, None
        try:
            with open(path, "rb") as f:
                head = b""
                while not head and (chunk := f.read(1 << 16)):
                    head = chunk.lstrip()[:1]
                f.seek(0)
                self.format = "json" if head == b"[" else "jsonl"
                starts, ends, lines = _json_list_index(path, f.read()) if self.format == "json" else _jsonl_index(f)
        except OSError as e:
            raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
        if not starts:
            raise DataError(f"{path}: no records")
        self._starts = np.asarray(starts, dtype=np.int64)
        self._ends = np.asarray(ends, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self):  # a DataLoader worker opens its own descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}

    def line(self, i: int) -> int:
        return int(self._lines[i])

    def location(self, i: int) -> str:
        return f"{self.path}:{self.line(i)}"

    def read(self, i: int) -> dict:
        """Record i parsed; SampleError if it is not a JSON object."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self._starts[i]), int(self._ends[i])
        raw = os.pread(self._fd, end - start, start)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SampleError(f"malformed JSON line: {e.msg} (column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise SampleError(f"not UTF-8: {e.reason}") from None
        if not isinstance(obj, dict):
            raise SampleError(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
