"""megamod.data.records: the streamed JSON-list / JSONL index against the whole-file parser it replaced, errors
naming file:line(:column), the index cache (reuse, invalidation, read-only folders)."""
import json
import os
import random

import numpy as np
import pytest

from megamod.data import records
from megamod.data.records import DataError, RecordFile
from megamod.data.templates import SampleError


def reference_index(path: str):
    """The parser of megamod <= 2026-12-04 (whole file read and decoded, raw_decode element by element)."""
    blob = open(path, "rb").read()
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason})") from None
    decoder = json.JSONDecoder()
    char_starts, starts, ends = [], [], []

    def to_byte(c):
        return len(text[:c].encode("utf-8"))

    def skip_ws(p):
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p, msg):
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
    lines = [text.count("\n", 0, p) + 1 for p in char_starts]
    return starts, ends, lines


def read_all(path: str) -> RecordFile:
    """RecordFile(path) with every record read (element JSON errors of a list surface on read)."""
    rf = RecordFile(path)
    for i in range(len(rf)):
        try:
            rf.read(i)
        except SampleError:
            pass
    return rf


NASTY = ['a [b] {c} d', 'q "quoted" \\ back\\slash', '\\', '\\\\', '\\"', '}]', '[{', ',', 'é 中 😀 \u2028',
         'line\nbreak\r\ttab', '', ' ', '"', '\\\\"]},[{', 'x' * 300]


def nasty_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(6 if depth < 3 else 3)
    if kind == 0:
        return rng.choice(NASTY) + rng.choice(NASTY)
    if kind == 1:
        return rng.choice([0, -1.5e3, True, None, 12345678901234])
    if kind == 2:
        return rng.choice(NASTY)
    if kind == 3:
        return [nasty_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(NASTY) + str(k): nasty_value(rng, depth + 1) for k in range(rng.randrange(4))}


def nasty_json_list(rng: random.Random) -> str:
    rows = [{"id": i, "conversations": [{"from": "human", "value": rng.choice(NASTY)}], "x": nasty_value(rng)}
            for i in range(rng.randrange(1, 12))]
    rows += [nasty_value(rng) for _ in range(rng.randrange(3))]  # elements that are not objects
    rng.shuffle(rows)
    style = rng.randrange(4)
    if style == 0:
        return json.dumps(rows, indent=rng.choice([None, 1, 4]), ensure_ascii=rng.random() < 0.5)
    ws = [" ", "\n", "\r\n", "\t", "", "  \n  "]
    parts = [json.dumps(r, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")]))
             for r in rows]
    return rng.choice(ws) + "[" + "".join(rng.choice(ws) + p + rng.choice(ws) + ("," if k < len(parts) - 1 else "")
                                         for k, p in enumerate(parts)) + rng.choice(ws) + "]" + rng.choice(ws)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_json_list_index_equals_the_whole_file_parse(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(records, "CHUNK_BYTES", chunk)
    rng = random.Random(chunk)
    for n in range(25 if chunk > 3 else 8):
        path = tmp_path / f"{n}.json"
        path.write_text(nasty_json_list(rng), encoding="utf-8")
        rf = read_all(str(path))
        starts, ends, lines = reference_index(str(path))
        assert rf._starts.tolist() == starts and rf._ends.tolist() == ends and rf._lines.tolist() == lines
        assert rf._starts.dtype == np.int64 and rf.format == "json"
        blob = path.read_bytes()
        assert [json.loads(blob[s:e]) for s, e in zip(starts, ends)] == json.loads(blob)


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_jsonl_index(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(records, "CHUNK_BYTES", chunk)
    rng = random.Random(0)
    rows = [json.dumps(nasty_value(rng)) if k % 4 else json.dumps({"id": k, "v": rng.choice(NASTY)})
            for k in range(30)]
    text = "\n".join(r if k % 5 else f"  \n{r}\r" for k, r in enumerate(rows)) + "\n\n"
    path = tmp_path / "a.jsonl"
    path.write_bytes(text.encode())
    rf = RecordFile(str(path))
    expect = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    assert rf._lines.tolist() == [n for n, _ in expect] and rf.format == "jsonl"
    blob = path.read_bytes()
    assert [blob[s:e].decode() for s, e in zip(rf._starts, rf._ends)] == [line for _, line in expect]


BROKEN = [
    '[\n {"id": 1, "conversations": []},\n {"id": 2 "conversations": []}\n]\n',  # missing ':' delimiter
    '[\n {"id": 1},\n {"id": 2}\n {"id": 3}\n]\n',  # missing ','
    '[\n {"id": 1},\n {"id": 2, "v": "cut off',  # truncated in a string
    '[\n {"id": 1},\n {"id": 2, "v": [1, 2',  # truncated in a list
    '[\n {"id": 1},\n {"id": 2}',  # no closing bracket
    '[\n {"id": 1},\n {"id": 2}\n]\n  {"x": 1}\n',  # extra data
    '[\n {"id": 1},,\n {"id": 2}\n]',  # empty element
    '[\n {"id": 1},\n {"id": "\xff"}\n]',  # not UTF-8 (written as latin-1)
    '[\n {"id": 1},\n {"id": tru}\n]',  # bad literal
]


@pytest.mark.parametrize("text", BROKEN)
@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_broken_json_list_names_file_line_column(tmp_path, monkeypatch, text, chunk):
    monkeypatch.setattr(records, "CHUNK_BYTES", chunk)
    path = tmp_path / "broken.json"
    path.write_bytes(text.encode("latin-1" if "\xff" in text else "utf-8"))
    with pytest.raises(DataError) as expected:
        reference_index(str(path))
    with pytest.raises(DataError) as got:
        read_all(str(path))
    assert str(got.value) == str(expected.value)
    assert str(got.value).startswith(f"{path}:")


def test_empty_and_trailing_comma(tmp_path):
    (tmp_path / "empty.json").write_text(" [ ]\n")
    with pytest.raises(DataError, match="no records"):
        RecordFile(str(tmp_path / "empty.json"))
    (tmp_path / "comma.json").write_text('[{"a": 1},\n]')
    assert len(RecordFile(str(tmp_path / "comma.json"))) == 1


def write_list(path, n=50, pad=""):
    rows = [{"id": k, "conversations": [{"from": "human", "value": f"q{k}{pad}"}]} for k in range(n)]
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def test_index_cache_reused_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "CACHE_MIN_BYTES", 0)
    monkeypatch.delenv(records.CACHE_DIR_ENV, raising=False)
    path = write_list(tmp_path / "d.json")
    cache = str(tmp_path / "d.json.megamod-index.npz")
    first = RecordFile(path)
    assert os.path.isfile(cache)
    builds = []
    real = records._json_list_index
    monkeypatch.setattr(records, "_json_list_index", lambda *a: builds.append(1) or real(*a))
    again = RecordFile(path)
    assert builds == [] and again._starts.tolist() == first._starts.tolist()
    assert again.read(3)["id"] == 3
    st = os.stat(path)  # same size, new mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    RecordFile(path)
    assert builds == [1]
    write_list(tmp_path / "d.json", n=51)  # new size
    rf = RecordFile(path)
    assert builds == [1, 1] and len(rf) == 51 and rf.read(50)["id"] == 50
    RecordFile(path)
    assert builds == [1, 1]
    with open(cache, "wb") as f:  # a corrupt cache is rebuilt
        f.write(b"junk")
    assert len(RecordFile(path)) == 51 and builds == [1, 1, 1]


def test_small_files_and_cache_off_leave_nothing(tmp_path, monkeypatch):
    path = write_list(tmp_path / "d.json")
    RecordFile(path)
    monkeypatch.setattr(records, "CACHE_MIN_BYTES", 0)
    monkeypatch.setenv(records.CACHE_DIR_ENV, "off")
    RecordFile(path)
    assert sorted(os.listdir(tmp_path)) == ["d.json"]


def test_cache_folder_for_read_only_data(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "CACHE_MIN_BYTES", 0)
    data, other = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    path = write_list(data / "d.jsonl".replace("jsonl", "json"))
    monkeypatch.setenv(records.CACHE_DIR_ENV, str(other))
    rf = RecordFile(path)
    assert os.listdir(data) == ["d.json"]
    (name,) = os.listdir(other)
    assert name.endswith("-d.json.megamod-index.npz")
    assert RecordFile(path)._lines.tolist() == rf._lines.tolist()


def test_cached_arrays_built_once_across_processes(tmp_path, monkeypatch):
    """Ranks of a node: one builds under the folder lock, the others wait and read."""
    import multiprocessing as mp
    monkeypatch.setattr(records, "CACHE_MIN_BYTES", 0)
    path = write_list(tmp_path / "d.json", n=2000, pad="x" * 200)
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        out = pool.map(_build_counting, [(path, str(tmp_path / "log"))] * 3)
    assert all(o == out[0] for o in out)
    assert open(tmp_path / "log").read() == "b"


def _build_counting(args):
    path, log = args

    def build():
        with open(log, "a") as f:
            f.write("b")
        import time
        time.sleep(0.3)
        return {"x": np.arange(5)}
    return records.cached_arrays(path, "test", build)["x"].tolist()
