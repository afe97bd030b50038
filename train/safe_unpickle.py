"""Reading the checkpoint formats that pickle, without running code from them.

Weights and moments are safetensors, but two native formats pickle Python objects: the
``.metadata`` file of a torch.distributed.checkpoint directory (FSDP) and DeepSpeed's
``*_states.pt`` files. A pickle can name any callable, so a checkpoint directory from
elsewhere could run code on ``resume``, ``init_from`` or any tool that reads it. Here each
is read with an allowlist of the classes those formats contain (found by listing the
globals of real checkpoints): anything else raises ``UnsafeCheckpoint`` naming the file and
the refused global, before it is called.

* DCP: ``SafeDCPReader`` replaces the reader's ``pickle.load`` of the metadata; shard
  files hold raw tensors that DCP itself loads with ``weights_only=True``.
* DeepSpeed: its engine and its universal-checkpoint converter load with
  ``weights_only=False``, so every ``.pt`` file is first checked with torch's own
  restricted unpickler (``weights_only=True``, memory-mapped so tensor data is not read)
  and DeepSpeed's loaders only run on files that passed.
"""

from __future__ import annotations

import os
import pickle
import re

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from train.checkpoint import CheckpointError


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file asks to unpickle something outside the format's allowlist."""


_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_ALLOWED = {
    (_DCP_META, name) for name in (
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{self.source}: refuses to unpickle {module}.{name}, which is not part of the DCP "
                               "metadata format; the file was not loaded (is this checkpoint from a trusted source?)")


def load_dcp_metadata(path: str) -> Metadata:
    """The ``.metadata`` file at ``path``, unpickled through the allowlist."""
    try:
        with open(path, "rb") as f:
            meta = _AllowlistUnpickler(f, path).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # truncated, garbage: name the file
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, Metadata):
        raise UnsafeCheckpoint(f"{path}: holds a {type(meta).__name__}, not DCP metadata")
    return meta


class SafeDCPReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read through the allowlist."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        meta = load_dcp_metadata(os.path.join(str(self.path), ".metadata"))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


def _deepspeed_globals() -> list:
    """The non-tensor classes DeepSpeed writes into its model and optimizer state files."""
    out = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


def check_deepspeed_files(directory: str) -> None:
    """Raise ``UnsafeCheckpoint`` if any ``.pt`` file under ``directory`` needs a global beyond
    tensors, containers and DeepSpeed's own state classes."""
    allowed = _deepspeed_globals()
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                what = found.group(1) if found else "an object outside the allowlist"
                raise UnsafeCheckpoint(f"{path}: refuses to unpickle {what}, which is not part of DeepSpeed's state "
                                       "format; the file was not loaded (is this checkpoint from a trusted source?)"
                                       ) from None
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
