"""The checkpoint directory's names: one owner for every file and directory name kiln
writes, and for which names are kiln's at all."""

from __future__ import annotations

import os
import re

META = "meta.json"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
MODEL_CONFIG = "model_config.yaml"
TOKENIZER = "tokenizer.model"
CHAT_TEMPLATE = "chat_template.jinja"
MODEL_FILE = "model.safetensors"  # full weights (single, ddp, converted)
OPTIM_FILE = "optimizer.safetensors"  # AdamW moments by parameter name
DCP_DIR = "dcp"  # fsdp: torch.distributed.checkpoint
DS_DIR = "deepspeed"  # deepspeed: its own shards
ADAPTER_FILE = "adapter.safetensors"  # LoRA runs: adapters (and a head) instead of full weights
ADAPTER_OPTIM_FILE = "adapter_optimizer.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PROMPT_TUNING_CONFIG = "prompt_tuning.json"  # prompt-tuning runs: N, base, base_digest (table in ADAPTER_FILE)
LABELS_FILE = "labels.json"  # classification runs
# What travels with the weights whenever a checkpoint is converted or merged.
CARRIED = (TRAINER_STATE, CONFIG, MODEL_CONFIG, TOKENIZER, CHAT_TEMPLATE)
HASH = "xxh3_128"
VERIFY_MODES = ("full", "size", "off")
STEP_DIR = re.compile(r"^step_(\d{8,})$")
# The exact names of what kiln's own saves leave behind when interrupted (begin, commit's
# replacement of a re-saved step, the atomic ``latest``, a pruned checkpoint being deleted):
# nothing else is ever cleaned.
TEMP_NAME = re.compile(r"^(\.tmp-step_\d{8,}|\.latest\.tmp\d+|step_\d{8,}\.old\d+|\.pruned-step_\d{8,})$")


def pruned_name(step_dir: str) -> str:
    """What a pruned checkpoint is renamed to before it is deleted (``TEMP_NAME``)."""
    return ".pruned-" + step_dir
# Files a rank writes for itself: DCP's ``__R_N.distcp``, DeepSpeed's ``*zero_pp_rank_R_*``.
WRITER = re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$|zero_pp_rank_(\d+)_")
DS_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Every name DeepSpeed writes under deepspeed/ (relative to it): the tag's state files, its
# ``latest`` pointer and the conversion scripts it copies beside them (listed, never run).
DS_FILE = re.compile(r"^(latest|zero_to_fp32\.py|zero_to_torch\.py|[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}/"
                     r"((bf16_|fp16_)?zero_pp_rank_\d+_)?mp_rank_\d\d_(model|optim)_states\.pt)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and the file."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No kiln checkpoint at all where one was expected."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step_N`` directory under ``root``, oldest first. Only the
    canonical name of a step counts (``step_dir_name``), with any number of digits past 8."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and name == step_dir_name(int(m.group(1))):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def writer_rank(rel: str) -> int | None:
    """The rank that writes ``rel`` (a file of its own shard), None for rank 0's shared files."""
    m = WRITER.search(rel)
    return int(m.group(1) or m.group(2)) if m else None
