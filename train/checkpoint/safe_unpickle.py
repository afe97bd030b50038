"""Reading the checkpoint formats that pickle, without running code from them.

Weights and moments are safetensors, but two native formats pickle Python objects: the
``.metadata`` file of a torch.distributed.checkpoint directory (FSDP) and DeepSpeed's
``*_states.pt`` files. A pickle can name any callable, so a checkpoint directory from
elsewhere could run code on ``resume``, ``init_from`` or any tool that reads it. Here each
is read with an allowlist of the classes those formats contain (found by listing the
globals of real checkpoints): anything else raises ``UnsafeCheckpoint`` naming the file and
the refused global, before it is called.

* DCP: ``SafeDCPReader`` replaces the reader's ``pickle.load`` of the metadata and checks
  it (tensor entries only, storage files the manifest lists); ``TensorOnlyLoadPlanner``
  never plans a bytes item, the one path where DCP unpickles with ``weights_only=False``.
  Shard files hold raw tensors that DCP loads with ``weights_only=True``.
* DeepSpeed: its engine and its universal-checkpoint converter load with
  ``weights_only=False``, so every ``.pt`` file is first checked with torch's own
  restricted unpickler (``weights_only=True``, memory-mapped so tensor data is not read)
  and DeepSpeed's loaders only run on files that passed. The files checked are the ones the
  checkpoint's manifest lists, and ``verify`` refuses a checkpoint that holds any other
  file, a link, or a DeepSpeed tag the manifest does not name.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType

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


def load_dcp_metadata(path: str, listed: Optional[set] = None) -> Metadata:
    """The ``.metadata`` file at ``path``, unpickled through the allowlist and checked: every
    entry is a tensor (a bytes entry would make DCP's planner unpickle its data with
    ``weights_only=False``), and every storage file it points at is a plain name in the same
    directory that the checkpoint's manifest lists (``listed``: names relative to it)."""
    if os.path.islink(path):
        raise UnsafeCheckpoint(f"{path}: is a symbolic link; refusing to read it")
    try:
        with open(path, "rb") as f:
            meta = _AllowlistUnpickler(f, path).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # truncated, garbage: name the file
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, Metadata):
        raise UnsafeCheckpoint(f"{path}: holds a {type(meta).__name__}, not DCP metadata")
    for key, entry in (meta.state_dict_metadata or {}).items():
        # earlier kiln versions saved AdamW's hyperparameters as bytes entries; they are never read
        # (TensorOnlyLoadPlanner), and nothing else may be a bytes entry
        if not isinstance(entry, TensorStorageMetadata) and not key.startswith(_LEGACY_BYTES):
            raise UnsafeCheckpoint(f"{path}: entry {key!r} is a {type(entry).__name__}, not a tensor; kiln's DCP "
                                   "checkpoints hold tensors only, and a bytes entry would be unpickled unchecked")
    for index, info in (meta.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not _PLAIN_NAME.match(rel) or (listed is not None and rel not in listed):
            raise UnsafeCheckpoint(f"{path}: storage entry {getattr(index, 'fqn', index)!r} points at {rel!r}, which "
                                   "is not a file of this checkpoint's manifest")
    return meta


_LEGACY_BYTES = "optim.param_groups."
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class SafeDCPReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read through the allowlist and checked against
    the checkpoint's manifest (``listed``: file names inside the DCP directory)."""

    def __init__(self, path: str, listed: Optional[set] = None):
        super().__init__(path)
        self.listed = listed

    def read_metadata(self, *args, **kwargs) -> Metadata:
        meta = load_dcp_metadata(os.path.join(str(self.path), ".metadata"), self.listed)
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that it never plans or loads a bytes item (the default
    ``load_bytes`` is ``torch.load(weights_only=False)``)."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type != LoadItemType.TENSOR:
                raise UnsafeCheckpoint(f"DCP checkpoint: {item.dest_index.fqn!r} is not a tensor; refusing to load it")
        return plan

    def load_bytes(self, read_item, value) -> None:
        raise UnsafeCheckpoint(f"DCP checkpoint: {read_item.dest_index.fqn!r} is not a tensor; refusing to unpickle it")


def dcp_load(state: dict, step_dir: str, no_dist: bool = False) -> None:
    """Load ``state`` (tensors) in place from the ``dcp/`` directory of the checkpoint at
    ``step_dir``, reading only files its manifest lists and never unpickling data."""
    import torch.distributed.checkpoint as dcp

    from train.checkpoint import DCP_DIR
    from train.checkpoint.manifest import dcp_files

    names = dcp_files(step_dir)
    path = os.path.join(step_dir, DCP_DIR)
    # Checked here first, so that a refusal is this error and not one DCP wraps per rank.
    load_dcp_metadata(os.path.join(path, ".metadata"), names)
    dcp.load(state, storage_reader=SafeDCPReader(path, names), planner=TensorOnlyLoadPlanner(),
             no_dist=no_dist)


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


def check_deepspeed_files(paths: list[str]) -> None:
    """Raise ``UnsafeCheckpoint`` if any ``.pt`` file of ``paths`` (the DeepSpeed files a
    checkpoint's manifest lists: ``train.checkpoint.ds_files``) needs a global beyond
    tensors, containers and DeepSpeed's own state classes."""
    allowed = _deepspeed_globals()
    for path in sorted(paths):
        if not path.endswith(".pt"):
            continue
        if os.path.islink(path):
            raise UnsafeCheckpoint(f"{path}: is a symbolic link; refusing to read it")
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
