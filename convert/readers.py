"""Lazy readers of checkpoint files: safetensors (any dtype, bf16 included) and PyTorch state dicts.

A reader maps tensor names to a `load(name) -> np.ndarray` without reading the data up front:
safetensors files are memory-mapped; PyTorch pickles are opened with `weights_only=True, mmap=True`,
so a checkpoint can never run code and is paged in only as tensors are used.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from jaxfire.errors import JaxfireError


class CheckpointReadError(JaxfireError):
    """A checkpoint file that cannot be read."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file, memory-mapped; parses the format directly so bf16 reads as ml_dtypes."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > 100 << 20:
                    raise ValueError(f"header length {header_len} is implausible")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointReadError(f"cannot read safetensors file {self.path}: {e}") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_len
        self._mmap: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self.header)

    def load(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointReadError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mmap[self.data_start + begin:self.data_start + end]
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize
        if raw.size != expected:
            raise CheckpointReadError(f"{self.path}: tensor {name} is truncated ({raw.size} of {expected} bytes)")
        return raw.view(dtype).reshape(info["shape"])


class TorchFile:
    """One PyTorch state-dict pickle (.bin / .pt / .pth)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            import torch
        except ImportError:
            raise CheckpointReadError(
                f"{self.path} is a PyTorch checkpoint and reading it needs torch: pip install torch") from None
        self._torch = torch
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt or unsafe pickles
            raise CheckpointReadError(f"cannot read PyTorch checkpoint {self.path}: {e}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointReadError(f"{self.path} does not hold a state dict (found {type(state).__name__})")
        self.state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def names(self) -> list[str]:
        return list(self.state)

    def load(self, name: str) -> np.ndarray:
        t = self.state[name].detach()
        if t.dtype == self._torch.bfloat16:
            return t.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        if t.dtype == self._torch.float8_e4m3fn:
            return t.contiguous().view(self._torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        return t.numpy()


class TensorIndex:
    """All tensors of a model directory, whichever file holds each."""

    def __init__(self, files: Iterable[SafetensorsFile | TorchFile]):
        self.files = list(files)
        self._where: dict[str, SafetensorsFile | TorchFile] = {}
        for f in self.files:
            for name in f.names():
                self._where[name] = f

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def load(self, name: str) -> np.ndarray:
        return self._where[name].load(name)

    def file_of(self, name: str) -> pathlib.Path:
        return self._where[name].path


def _files_from_index(directory: pathlib.Path, index_name: str) -> list[pathlib.Path]:
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointReadError(f"cannot read shard index {index_path}: {e}") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise CheckpointReadError(f"{index_path} names shard files that are missing: {', '.join(missing)}")
    return [directory / f for f in files]


def open_model_dir(directory: str | os.PathLike) -> TensorIndex:
    """Finds a Hugging Face model's weight files: safetensors first, then PyTorch pickles."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        raise CheckpointReadError(f"model directory {d} does not exist")
    opener: Callable[[pathlib.Path], SafetensorsFile | TorchFile]
    if (d / "model.safetensors.index.json").is_file():
        paths, opener = _files_from_index(d, "model.safetensors.index.json"), SafetensorsFile
    elif list(d.glob("*.safetensors")):
        paths, opener = sorted(d.glob("*.safetensors")), SafetensorsFile
    elif (d / "pytorch_model.bin.index.json").is_file():
        paths, opener = _files_from_index(d, "pytorch_model.bin.index.json"), TorchFile
    else:
        paths = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in d.glob(ext))
        opener = TorchFile
    if not paths:
        raise CheckpointReadError(f"no weight files (*.safetensors, *.bin, *.pt, *.pth) found in {d}")
    return TensorIndex(opener(p) for p in paths)
