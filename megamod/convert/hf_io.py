"""Reading and writing HF safetensors checkpoints tensor by tensor (single file or sharded with an index)."""
from __future__ import annotations

import json
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory; tracks which ones were read.

    `rename` maps on-disk names to the names callers use (several layouts of one format, read as one)."""

    def __init__(self, hf_dir: str, rename=None):
        self.dir = hf_dir
        config_path = os.path.join(hf_dir, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path}: no config.json in the HF checkpoint directory")
        with open(config_path) as f:
            self.config = json.load(f)
        index_path = os.path.join(hf_dir, INDEX)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self._file_of = dict(json.load(f)["weight_map"])
        elif os.path.exists(os.path.join(hf_dir, SINGLE)):
            self._file_of = {}
            with safe_open(os.path.join(hf_dir, SINGLE), "pt") as f:
                self._file_of = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: neither {SINGLE} nor {INDEX} found (only safetensors are read)")
        if rename is not None:
            renamed = {}
            for disk_name, fname in self._file_of.items():
                name = rename(disk_name)
                if name in renamed:
                    raise ValueError(f"{hf_dir}: tensors {renamed[name][0]!r} and {disk_name!r} both mean {name!r}")
                renamed[name] = (disk_name, fname)
            self._disk_name = {name: disk for name, (disk, _) in renamed.items()}
            self._file_of = {name: fname for name, (_, fname) in renamed.items()}
        else:
            self._disk_name = {name: name for name in self._file_of}
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.read: set[str] = set()

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        fname = self._file_of[name]
        if fname not in self._handles:
            self._handles[fname] = self._stack.enter_context(safe_open(os.path.join(self.dir, fname), "pt"))
        self.read.add(name)
        return self._handles[fname].get_tensor(self._disk_name[name])

    def unread(self) -> list[str]:
        return sorted(set(self._file_of) - self.read)

    def close(self):
        self._stack.close()


class HFWriter:
    """Writes tensors into safetensors shards of at most `shard_bytes`, then the index (or one file if it fits)."""

    def __init__(self, out_dir: str, shard_bytes: int = 4 * 1024**3):
        self.dir = out_dir
        self.shard_bytes = shard_bytes
        os.makedirs(out_dir, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        # Shards are written under temporary names, renamed once the total count is known.
        path = os.path.join(self.dir, f"tmp-{len(self._shards):05d}.safetensors")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(os.path.join(self.dir, "tmp-00000.safetensors"), os.path.join(self.dir, SINGLE))
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, f"tmp-{i:05d}.safetensors"), os.path.join(self.dir, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
