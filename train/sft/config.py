"""The fine-tuning config: ``PretrainConfig`` plus what only fine-tuning needs.

``SFTConfig`` extends the pretraining schema rather than copying it, so optimizer, train,
checkpoint, logger and backend keys mean the same thing in both entrypoints, and
``task=continued_pretraining`` is literally the pretraining run started from a checkpoint.
The sequence length is ``data.seq_len`` for every task (one key, not two).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from train.config import PretrainConfig, _check
from train.errors import ConfigError

TASKS = ("instruction", "classification", "continued_pretraining", "preference", "reward")
FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "classification")
MASKS = ("assistant", "last_assistant", "all_turns", "all")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Why QLoRA runs under backend=single and ddp only: FSDP2 shards every parameter as a DTensor
# and ZeRO flattens them, but a 4-bit weight is a packed uint8 tensor whose quant_state
# (scales, shape, dtype) lives beside it and would be neither sharded nor gathered with it.
QLORA_BACKENDS = ("4-bit base weights work with backend=single or ddp only: FSDP shards parameters as DTensors and "
                  "DeepSpeed ZeRO flattens them, and a 4-bit weight's quant_state (its scales) would not follow")


@dataclass
class SFTDataConfig:
    paths: list[str] = field(default_factory=list)  # .jsonl / .parquet files, or local HF dataset dirs
    source: str = "auto"  # auto (by extension; a directory = HF dataset) | jsonl | parquet | hf
    hf_split: str = "train"  # split of a local HF DatasetDict
    format: str = "auto"  # auto (per record, from its keys) | alpaca | chat | prompt_completion | classification
    val_paths: list[str] = field(default_factory=list)  # explicit held-out files; else val_fraction of paths
    val_fraction: float = 0.05  # stable hash of the record's content decides its split
    mask: str = "assistant"  # loss on: assistant (every assistant turn) | last_assistant | all_turns | all
    packing: bool = True  # several examples per sequence, isolated by doc_ids + per-document positions
    truncation: str = "drop"  # examples longer than data.seq_len + 1 tokens: drop | truncate (both counted)
    skip_bad_records: bool = False  # false: a bad record stops the run naming file and line
    text_key: str = "text"  # classification: input text
    label_key: str = "label"  # classification: class (string or int)
    labels: list[str] = field(default_factory=list)  # classification: class names; empty = sorted labels of the data
    class_weights: list[float] = field(default_factory=list)  # classification: one per class; empty = equal
    seed: int = 1234  # epoch shuffling of the examples


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    name: str = "default"  # adapter name: several adapters can live on one base model
    quantize: Optional[str] = None  # None | 4bit (QLoRA: NF4 + double quantization, bitsandbytes, CPU or CUDA)


@dataclass
class PromptTuningConfig:
    """Prompt tuning (model/prompt_tuning.py): n_tokens trained virtual-token embeddings
    before every input, the base frozen; checkpoints hold the table (and a head) only."""

    enabled: bool = False
    n_tokens: int = 20
    init_text: str = ""  # initialise from this text's token embeddings (cycled to n_tokens); empty: vocabulary rows
    seed: int = 0  # which vocabulary rows, when init_text is empty


@dataclass
class SFTEvalConfig:
    prompts: list[str] = field(default_factory=list)  # fixed prompts for the before/after generation table
    max_new_tokens: int = 48
    report: str = "${run_dir}/generations.md"


@dataclass
class DPOConfig:
    """task=preference (launch/dpo.py): records {prompt, chosen, rejected} from sft.paths."""

    loss: str = "dpo"  # dpo | cdpo (conservative: label_smoothing) | ipo
    beta: float = 0.1  # strength of the pull towards the reference (larger: stay closer)
    label_smoothing: float = 0.0  # cdpo: the assumed share of flipped preference labels, in [0, 0.5)
    # ipo: log-probs averaged over each reply's tokens before the loss, as TRL computes IPO
    # (mean, the default), or summed over the reply (sum). dpo and cdpo always use sums.
    ipo_logps: str = "mean"
    # The reference log-probs are those of the starting weights, computed once before training
    # by every rank with the model as set up (sharded or not): no second model is ever held.
    # With LoRA the reference is the base: the adapters start at zero.
    margin: float = 0.0  # task=reward: Bradley-Terry with a margin, -log sigmoid(r_chosen - r_rejected - margin)
    # A file for the reference log-probs: read when it matches (same starting checkpoint, pairs
    # and sequence length), else computed and written, so later runs on the same data skip the
    # reference pass. null: computed in memory at every start.
    reference_cache: Optional[str] = None


@dataclass
class SFTConfig(PretrainConfig):
    task: str = "instruction"  # instruction | classification | continued_pretraining | preference
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)


def register_sft_configs() -> None:
    from train.config import register_configs

    register_configs()
    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)


def validate_sft(cfg: Any) -> None:
    """Fine-tuning relations, after ``train.config.validate``. Raises ConfigError(key)."""
    _check(cfg.task in TASKS, "task", f"unknown task {cfg.task!r} ({' | '.join(TASKS)})")
    init = str(cfg.init_from or "")
    if not init:
        raise ConfigError("init_from", "fine-tuning needs a checkpoint: init_from=<kiln run, checkpoints root or "
                          "step dir> or init_from=hf:<dir>")
    if not init.startswith("hf:") and not os.path.isdir(init):
        how = ("`python launch/sft.py` (writes runs/sft)" if cfg.task in ("preference", "reward")
               else "`python launch/pretrain.py` (writes runs/default)")
        raise ConfigError("init_from", f"checkpoint directory not found: {init!r}. Make the default one with "
                          f"{how}, or pass init_from=<your run dir>")
    s, lo = cfg.sft, cfg.lora
    if cfg.task != "continued_pretraining":
        _check(len(s.paths) > 0, "sft.paths", "no fine-tuning data file given")
        for i, p in enumerate(list(s.paths) + list(s.val_paths)):
            _check(os.path.exists(str(p)), f"sft.paths[{i}]", f"not found: {p!r}")
    if cfg.task == "preference":
        from train.sft.preference import IPO_LOGPS, LOSSES

        d = cfg.dpo
        _check(d.loss in LOSSES, "dpo.loss", f"unknown loss {d.loss!r} ({' | '.join(LOSSES)})")
        _check(d.beta > 0, "dpo.beta", f"must be positive, got {d.beta}")
        _check(0.0 <= d.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {d.label_smoothing}")
        _check(d.label_smoothing == 0.0 or d.loss == "cdpo", "dpo.label_smoothing", "only dpo.loss=cdpo uses it")
        _check(d.ipo_logps in IPO_LOGPS, "dpo.ipo_logps", f"unknown {d.ipo_logps!r} ({' | '.join(IPO_LOGPS)})")
    if cfg.task == "reward":
        _check(cfg.dpo.margin >= 0, "dpo.margin", f"must be >= 0, got {cfg.dpo.margin}")
    _check(s.source in ("auto", "jsonl", "parquet", "hf"), "sft.source",
           f"unknown source {s.source!r} (auto | jsonl | parquet | hf)")
    _check(s.format in FORMATS, "sft.format", f"unknown format {s.format!r} ({' | '.join(FORMATS)})")
    _check(s.mask in MASKS, "sft.mask", f"unknown mask policy {s.mask!r} ({' | '.join(MASKS)})")
    _check(s.truncation in ("drop", "truncate"), "sft.truncation",
           f"unknown truncation policy {s.truncation!r} (drop | truncate)")
    _check(0.0 <= s.val_fraction < 1.0, "sft.val_fraction", f"must be in [0, 1), got {s.val_fraction}")
    if s.class_weights:
        _check(all(w > 0 for w in s.class_weights), "sft.class_weights", "every weight must be positive")
        _check(not s.labels or len(s.class_weights) == len(s.labels), "sft.class_weights",
               f"{len(s.class_weights)} weights for {len(s.labels)} classes (sft.labels)")
    if lo.enabled:
        _check(lo.rank > 0, "lora.rank", f"must be positive, got {lo.rank}")
        _check(lo.alpha > 0, "lora.alpha", f"must be positive, got {lo.alpha}")
        _check(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
        bad = [t for t in lo.targets if t not in LORA_TARGETS]
        _check(not bad and len(lo.targets) > 0, "lora.targets",
               f"unknown projection(s) {bad} (choose from {' '.join(LORA_TARGETS)})")
        _check(bool(lo.name) and lo.name.replace("_", "").isalnum(), "lora.name",
               f"must be a non-empty identifier, got {lo.name!r}")
        _check(cfg.task != "continued_pretraining", "lora.enabled", "LoRA is for instruction/classification tasks")
    pt = cfg.get("prompt_tuning")
    if pt is not None and pt.enabled:
        _check(pt.n_tokens >= 1, "prompt_tuning.n_tokens", f"must be at least 1, got {pt.n_tokens}")
        _check(not lo.enabled, "prompt_tuning.enabled", "prompt tuning and lora.enabled=true are exclusive")
        _check(cfg.task in ("instruction", "classification"), "prompt_tuning.enabled",
               f"prompt tuning is for task=instruction or classification, not {cfg.task}")
        _check(cfg.task == "classification" or not s.packing, "prompt_tuning.enabled",
               "needs sft.packing=false: the virtual tokens go before each example, and a packed row holds several")
        _check(cfg.backend.name not in ("fsdp", "deepspeed"), "prompt_tuning.enabled",
               f"runs with backend=single or ddp, not backend={cfg.backend.name} (not tested under sharding backends)")
    _check(lo.quantize in (None, "4bit"), "lora.quantize", f"unknown quantization {lo.quantize!r} (null | 4bit)")
    if lo.quantize:
        _check(lo.enabled, "lora.quantize", "4-bit base weights (QLoRA) need lora.enabled=true")
        from model.lora import qlora_unavailable_reason

        why = qlora_unavailable_reason()
        _check(why is None, "lora.quantize", f"4bit needs bitsandbytes (CPU or CUDA): {why}")
        _check(cfg.backend.name not in ("fsdp", "deepspeed"), "lora.quantize", QLORA_BACKENDS)
