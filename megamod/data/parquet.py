"""Data published as parquet, read directly with pyarrow: RLAIF-V's preference pairs with their images embedded.

openbmb/RLAIF-V-Dataset's shards have the columns ds_name, image (a struct {bytes: binary, path: string}: the HF
datasets Image feature), question, chosen, rejected, origin_dataset, origin_split, idx and image_path. A `.parquet`
file, or a directory of them (its `*.parquet` files in name order, one data set), stands wherever a JSON/JSONL file
does (`data.train: [{path: ..., kind: pairs}]`). Each row becomes the dict a JSON record would be, so schema.py
checks and maps it exactly as it does the LLaVA-style JSON pairs (RLAIF-V's question gets "<image>\\n" before it);
the extra columns are read and ignored. Conversations (a "conversations" column of {from, value} structs) work too.

The image column ("image", a struct with "bytes") is not read with the text: a row's image is an `EmbeddedImage`,
"FILE row N", decoded from its bytes when the sample is read. Where the bytes are null and the struct has a path,
that path is an image file relative to the image folder (the HF Image feature's meaning). A row with neither is a
bad sample found at start-up (the row groups' null counts say where to look without reading any image); bytes that
do not decode are found when the sample is read. Either names the parquet file and the row (counted from 0, as
pyarrow and datasets count them), and data.on_bad_sample decides as for JSON.

Only metadata is read up front (row counts per row group); the text columns of one row group at a time, and the
image column of one row group at a time, are read when asked for (memory-mapped files, one cached group each per
process), so a sequential scan reads every text column once and never an image.
"""
from __future__ import annotations

import os

import numpy as np

from megamod.data.images import ImageError, ImageProcessor, decode_rgb
from megamod.data.records import DataError
from megamod.data.templates import SampleError

SUFFIX = ".parquet"
IMAGE_COLUMN = "image"


def is_parquet(path: str) -> bool:
    """A path read by ParquetRecords: a .parquet file or a directory (of .parquet shards)."""
    return path.endswith(SUFFIX) or os.path.isdir(path)


def shard_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(SUFFIX))
    if not files:
        raise DataError(f"{path}: a directory without {SUFFIX} files")
    return files


class EmbeddedImage(str):
    """An image whose bytes are in a parquet row; reads as "FILE row N" in messages."""

    def __new__(cls, file: str, shard: int, row: int):
        self = super().__new__(cls, f"{file} row {row}")
        self.file, self.shard, self.row = file, shard, row
        return self

    def __reduce__(self):
        return EmbeddedImage, (self.file, self.shard, self.row)


def _required(kind: str, schema) -> list[str]:
    import pyarrow as pa

    if kind == "conversations":
        return ["conversations"]
    flat = "chosen" not in schema.names or not (pa.types.is_list(schema.field("chosen").type)
                                                 or pa.types.is_large_list(schema.field("chosen").type))
    return ["question", "chosen", "rejected"] if flat else ["chosen", "rejected"]


def _is_image_struct(field) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0


def column_kind(path: str) -> str | None:
    """"conversations" or "pairs" from the first shard's columns (check-data's --kind default), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = shard_files(path)[0]
    try:
        names = pq.read_schema(file).names
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read parquet file {file}: {e}") from None
    return "conversations" if "conversations" in names else "pairs" if "chosen" in names else None


class ParquetRecords:
    """The rows of one parquet file or directory of shards, as RecordFile gives JSON records: `len`, `read(i)` (a
    dict), `location(i)` ("FILE row N"); and `load_images` for the embedded images."""

    format = "parquet"

    def __init__(self, path: str, kind: str = "pairs"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.files = path, shard_files(path)
        self._text_columns, self._has_image = [], []
        group_shard, group_index, group_first, group_sizes, no_nulls = [], [], [], [], []
        for s, file in enumerate(self.files):
            try:
                meta = pq.read_metadata(file)
                schema = meta.schema.to_arrow_schema()
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"cannot read parquet file {file}: {e}") from None
            missing = [c for c in _required(kind, schema) if c not in schema.names]
            if missing:
                raise DataError(f'{file}: no column "{missing[0]}" (a {kind} file needs '
                                f'{", ".join(_required(kind, schema))}; it has {", ".join(schema.names)})')
            has_image = IMAGE_COLUMN in schema.names and _is_image_struct(schema.field(IMAGE_COLUMN))
            self._has_image.append(has_image)
            self._text_columns.append([f.name for f in schema if not _is_image_struct(f)
                                       and not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)])
            leaf = self._bytes_leaf(meta) if has_image else None
            first = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                stats = meta.row_group(g).column(leaf).statistics if leaf is not None else None
                group_shard.append(s)
                group_index.append(g)
                group_first.append(first)
                group_sizes.append(rows)
                no_nulls.append(stats is not None and stats.has_null_count and stats.null_count == 0)
                first += rows
        self._group_shard = np.asarray(group_shard, dtype=np.int64)
        self._group_index = np.asarray(group_index, dtype=np.int64)
        self._group_first = np.asarray(group_first, dtype=np.int64)  # first row of the group in its shard
        self._group_start = np.cumsum([0] + group_sizes).astype(np.int64)  # first global row of each group
        self._group_no_nulls = np.asarray(no_nulls, dtype=bool)  # every row of the group has image bytes
        if self._group_start[-1] == 0:
            raise DataError(f"{path}: no records")
        self._open, self._pid = {}, None

    @staticmethod
    def _bytes_leaf(meta) -> int | None:
        for c in range(meta.num_columns):
            if meta.schema.column(c).path == f"{IMAGE_COLUMN}.bytes":
                return c
        return None

    def __len__(self) -> int:
        return int(self._group_start[-1])

    def __getstate__(self):  # a DataLoader worker opens its own files
        return {**self.__dict__, "_open": {}, "_pid": None}

    def _where(self, i: int) -> tuple[int, int, int]:
        """(group, shard, row in shard) of global row i."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        g = int(np.searchsorted(self._group_start, i, side="right")) - 1
        return g, int(self._group_shard[g]), int(self._group_first[g] + i - self._group_start[g])

    def line(self, i: int) -> int:
        return self._where(i)[2]

    def location(self, i: int) -> str:
        _, s, row = self._where(i)
        return f"{self.files[s]} row {row}"

    def _file(self, s: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if s not in self._open:
            self._open[s] = pq.ParquetFile(self.files[s], memory_map=True)
        return self._open[s]

    def _cached(self, key: str, g: int, columns: list[str]):
        """The columns of group g as a table, one group cached per key and process."""
        hit = self._open.get(key) if self._pid == os.getpid() else None
        if hit is not None and hit[0] == g:
            return hit[1]
        table = self._file(int(self._group_shard[g])).read_row_group(int(self._group_index[g]), columns=columns)
        self._open[key] = (g, table)
        return table

    def _image_entry(self, g: int, s: int, r: int, row: int):
        """The row's image: EmbeddedImage, a path (bytes null, path given), or a SampleError."""
        if self._group_no_nulls[g]:
            return EmbeddedImage(self.files[s], s, row)
        value = self._cached("image", g, [IMAGE_COLUMN]).column(IMAGE_COLUMN)[r].as_py()
        if value is not None and value.get("bytes") is not None:
            return EmbeddedImage(self.files[s], s, row)
        if value is not None and isinstance(value.get("path"), str) and value["path"].strip():
            return value["path"]
        raise SampleError(f'no image: the "{IMAGE_COLUMN}" column has neither bytes nor a path')

    def read(self, i: int) -> dict:
        """Row i as a dict of its text columns, "image" an EmbeddedImage (or a path); SampleError if it has none."""
        g, s, row = self._where(i)
        r = i - int(self._group_start[g])
        obj = self._cached("text", g, self._text_columns[s]).slice(r, 1).to_pylist()[0]
        if self._has_image[s]:
            try:
                obj[IMAGE_COLUMN] = self._image_entry(g, s, r, row)
            except SampleError as e:  # the id, which the dataset cannot read from a record that fails
                sample_id = next((obj[k] for k in ("id", "idx") if obj.get(k) is not None), None)
                raise SampleError(f"{e} (id={sample_id})" if sample_id is not None else str(e)) from None
        return obj

    def image_bytes(self, image: EmbeddedImage) -> bytes:
        i = int(self._group_start[np.searchsorted(self._group_shard, image.shard)])  # the shard's first row
        g, s, _ = self._where(i + image.row)
        value = self._cached("image", g, [IMAGE_COLUMN]).column(IMAGE_COLUMN)[i + image.row - int(self._group_start[g])]
        blob = value.as_py()
        if blob is None or blob.get("bytes") is None:
            raise ImageError(f"no image bytes in {image}")
        return blob["bytes"]

    def load_images(self, paths: list[str], folder: str, processor: ImageProcessor):
        """float32 [n, 3, R, R] as datasets.load_images, the embedded images decoded from their bytes."""
        import torch

        if not paths:
            return torch.zeros(0, 3, processor.size, processor.size)
        return torch.stack([processor(decode_rgb(self.image_bytes(p), str(p))) if isinstance(p, EmbeddedImage)
                            else processor.load(os.path.join(folder, p)) for p in paths])
