"""Every knob of a kiln run, as typed dataclasses registered with Hydra.

The YAML files under ``conf/`` only pick values; the schema lives here, so a misspelt key
or a value of the wrong type fails in Hydra with the key's name, and ``validate`` checks
the relations between values (n_heads divides d_model, ...) before any heavy work.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data_pipeline.config import DataConfig
from model.llama import ModelConfig
from train.checkpoint import VERIFY_MODES
from train.errors import ConfigError  # noqa: F401  (re-exported: train/errors.py)
from train.launcher import BACKENDS, resolve_backend

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO_ROOT, "data_pipeline", "assets")


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # None: train one on the training data, cached in the run directory
    vocab_size: int = 8192
    train_max_docs: int = 20000  # documents read from the pipeline to train it
    output: str = "${run_dir}/tokenizer.model"  # where launch/train_tokenizer.py writes


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # not applied to norms and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    fused: Optional[bool] = None  # None: fused AdamW where the device supports it


@dataclass
class TrainConfig:
    max_steps: int = 200
    stop_at_step: Optional[int] = None  # checkpoint and exit after this step (the schedule still spans max_steps)
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    eval_every: int = 50  # steps between validations (0: never); step 0 and the last step included
    # Held-out windows per validation: the first eval_sequences of the validation split, the same set
    # for any world size, micro-batch or accumulation; each of N ranks evaluates 1/N of them.
    eval_sequences: int = 64
    log_every: int = 10
    seed: int = 1337
    # shards (exact on any world size that divides virtual_shards; each rank runs 1/N of the
    # pipeline) | sequences (exact on any world size; every rank runs the whole pipeline) |
    # documents (each rank its own stream; exact on the same world size). See train/data.py.
    data_sharding: str = "shards"
    virtual_shards: int = 8  # fixed for a run: changing it changes the stream
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on capable GPUs, else fp32) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs only
    # A non-finite loss: raise (stop; checkpoints are untouched) | rollback (reload the last
    # checkpoint of this run, skip the global batch that produced it, go on; at most max_rollbacks).
    nan_policy: str = "raise"
    max_rollbacks: int = 3
    sample_prompt: str = "The Python interpreter"
    sample_tokens: int = 48


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (and one at the end)
    keep_last: int = 3
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    # Check a checkpoint against its manifest before reading it (resume, init_from, tools):
    # full (sizes and content checksums), size (sizes only), off.
    verify: str = "full"
    # Write checkpoints in the background: training goes on while the files are written,
    # fsynced and hashed, and the checkpoint is committed (renamed, ``latest`` moved) only
    # once every file is durable. FSDP: DCP async_save; single/DDP: a host copy written by
    # a thread; DeepSpeed writes synchronously, and only hashing and commit move.
    async_save: bool = False


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "kiln"
    entity: Optional[str] = None
    mode: str = "offline"  # offline never touches the network; set online to sync


@dataclass
class LoggerConfig:
    jsonl: bool = True
    tensorboard: bool = False
    progress_bar: Optional[bool] = None  # None: only on an interactive terminal
    plot: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class BackendConfig:
    name: str = "auto"  # auto (follow the launcher: train/launcher.py) | single | ddp | deepspeed | fsdp
    chosen_because: Optional[str] = None  # written by kiln when it resolves auto: why this backend runs
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    ds_config: Optional[str] = None  # a user's DeepSpeed JSON, merged over the generated one
    reshard_after_forward: bool = True
    hybrid_shard: bool = False
    # fsdp: tensor-parallel ranks per model replica (a mesh of data x tensor parallelism,
    # train/parallel/); must divide the world size, model.n_heads and model.n_kv_heads.
    tp: int = 1
    # Context parallelism (sequence split across ranks inside attention): not implemented, any
    # value but 1 is a config error saying why (train/parallel/mesh.py).
    cp: int = 1
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_minutes: int = 30


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    run_name: str = "default"
    run_dir: str = "runs/${run_name}"
    resume: str = "auto"  # auto (latest good checkpoint of run_dir, if any) | none | <checkpoint dir>
    init_from: Optional[str] = None  # a kiln checkpoint dir whose weights start the run


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: os.path.join(ASSETS, name))


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(key, msg)


def validate_data(d: Any) -> None:
    """The ``data`` block's own checks (also run by launch/prepare_data.py, which has no
    model). Raises ConfigError(key)."""
    _check(d.seq_len > 0, "data.seq_len", f"must be positive, got {d.seq_len}")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _check(len(d.sources) > 0, "data.sources", "no data source configured")
    for i, s in enumerate(d.sources):
        _check(s.format in ("warc", "wet", "jsonl", "parquet", "hf", "tokens"), f"data.sources[{i}].format",
               f"unknown format {s.format!r} (warc | wet | jsonl | parquet | hf | tokens)")
        _check((s.format == "tokens") == (d.sources[0].format == "tokens"), f"data.sources[{i}].format",
               "tokenized shards (format: tokens) cannot be mixed with text sources in one run")
        _check(bool(s.paths) or s.format == "hf", f"data.sources[{i}].paths", "no input path given")
        _check(s.weight > 0, f"data.sources[{i}].weight", f"must be positive, got {s.weight}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(d.prefetch > 0, "data.prefetch", f"must be positive, got {d.prefetch}")
    from data_pipeline.filters.safety import URL_CATEGORIES
    from data_pipeline.text import WORD_TOKENIZERS

    _check(d.words in WORD_TOKENIZERS, "data.words", f"unknown tokenizer {d.words!r} ({' | '.join(WORD_TOKENIZERS)})")
    _check(d.words != "spacy" or importlib.util.find_spec("spacy") is not None, "data.words",
           "spacy needs the spaCy package: pip install 'kiln[fineweb]'")

    qm = d.quality_model
    _check(not qm.enabled or (qm.model_path and os.path.isfile(str(qm.model_path))), "data.quality_model.model_path",
           f"the quality_model step needs a model file (launch/train_quality_model.py), got {qm.model_path!r}")
    _check(qm.threshold is None or 0.0 <= qm.threshold <= 1.0, "data.quality_model.threshold",
           f"must be in [0, 1] or null (the model's own), got {qm.threshold}")
    _check(qm.enabled or not qm.replace_heuristics, "data.quality_model.replace_heuristics",
           "true replaces the heuristics with the quality model, which is disabled "
           "(set data.quality_model.enabled=true with a model_path, or replace_heuristics=false)")
    bad = [c for c in d.url_filter.categories if c not in URL_CATEGORIES]
    _check(not bad, "data.url_filter.categories", f"unknown {bad} (shipped: {' | '.join(URL_CATEGORIES)})")


def validate(cfg: Any) -> None:
    """Relations between values that types cannot express. Raises ConfigError(key)."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    validate_data(d)
    _check(m.d_model > 0, "model.d_model", f"must be positive, got {m.d_model}")
    _check(m.n_heads > 0 and m.d_model % m.n_heads == 0, "model.n_heads",
           f"must divide model.d_model={m.d_model}, got {m.n_heads}")
    kv = m.n_kv_heads or m.n_heads
    _check(kv > 0 and m.n_heads % kv == 0, "model.n_kv_heads",
           f"must divide model.n_heads={m.n_heads}, got {m.n_kv_heads}")
    _check((m.d_model // max(m.n_heads, 1)) % 2 == 0, "model.n_heads",
           f"head dim d_model/n_heads={m.d_model // max(m.n_heads, 1)} must be even for rotary embeddings")
    _check(m.n_layers > 0, "model.n_layers", f"must be positive, got {m.n_layers}")
    _check(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", f"must be positive, got {m.vocab_size}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(m.attention in ("auto", "flex", "sdpa"), "model.attention", f"must be auto, flex or sdpa, got {m.attention!r}")
    # With init_from=hf: the HF config's max_position_embeddings applies (checked by the trainer).
    _check(d.seq_len <= m.max_seq_len or str(cfg.init_from or "").startswith("hf:"), "data.seq_len",
           f"{d.seq_len} exceeds the model's maximum model.max_seq_len={m.max_seq_len}")
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(0.0 <= o.beta1 < 1.0, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    _check(0.0 <= o.beta2 < 1.0, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.schedule in ("cosine", "wsd", "constant"), "optim.schedule",
           f"unknown schedule {o.schedule!r} (cosine | wsd | constant)")
    _check(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}")
    _check(o.name in ("adamw",), "optim.name", f"unknown optimizer {o.name!r} (adamw)")
    _check(t.max_steps > 0, "train.max_steps", f"must be positive, got {t.max_steps}")
    _check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be positive, got {t.micro_batch_size}")
    _check(t.grad_accum_steps > 0, "train.grad_accum_steps", f"must be positive, got {t.grad_accum_steps}")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _check(t.eval_sequences >= 0, "train.eval_sequences", f"must be >= 0, got {t.eval_sequences}")
    _check(t.log_every > 0, "train.log_every", f"must be positive, got {t.log_every}")
    _check(t.data_sharding in ("shards", "sequences", "documents"), "train.data_sharding",
           f"unknown mode {t.data_sharding!r} (shards | sequences | documents)")
    _check(t.virtual_shards > 0, "train.virtual_shards", f"must be positive, got {t.virtual_shards}")
    _check(t.data_sharding != "documents" or d.sources[0].format != "tokens", "train.data_sharding",
           "tokenized shards are read by position: use train.data_sharding=shards or sequences")
    _check(d.num_workers == 0 or t.data_sharding != "sequences", "data.num_workers",
           f"{d.num_workers} background workers need train.data_sharding=shards or documents (with sequences, "
           "every rank reads the one global stream in order)")
    _check(d.num_workers == 0 or d.sources[0].format != "tokens", "data.num_workers",
           "tokenized shards need no background workers (a window is a slice of a memory-mapped file); set 0")
    _check(t.nan_policy in ("raise", "rollback"), "train.nan_policy",
           f"unknown policy {t.nan_policy!r} (raise | rollback)")
    _check(t.max_rollbacks >= 0, "train.max_rollbacks", f"must be >= 0, got {t.max_rollbacks}")
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", f"unknown device {t.device!r} (auto | cpu | cuda)")
    _check(t.precision in ("auto", "fp32", "bf16"), "train.precision",
           f"unknown precision {t.precision!r} (auto | fp32 | bf16)")
    _check(cfg.checkpoint.every > 0, "checkpoint.every", f"must be positive, got {cfg.checkpoint.every}")
    _check(cfg.checkpoint.verify in VERIFY_MODES, "checkpoint.verify",
           f"unknown mode {cfg.checkpoint.verify!r} ({' | '.join(VERIFY_MODES)})")
    _check(cfg.checkpoint.keep_last > 0, "checkpoint.keep_last", f"must be positive, got {cfg.checkpoint.keep_last}")
    _check(cfg.logger.wandb.mode in ("offline", "online", "disabled"), "logger.wandb.mode",
           f"unknown mode {cfg.logger.wandb.mode!r} (offline | online | disabled)")
    b = cfg.backend
    _check(b.name in BACKENDS, "backend.name", f"unknown backend {b.name!r} ({' | '.join(BACKENDS)})")
    resolve_backend(cfg)  # auto -> the launcher's backend; single under a multi-process launcher fails here
    _check(b.zero_stage in (0, 1, 2, 3), "backend.zero_stage", f"must be 0, 1, 2 or 3, got {b.zero_stage}")
    validate_deepspeed(cfg)
    from train.parallel.mesh import layout

    layout(cfg, int(os.environ.get("WORLD_SIZE", "1") or 1))  # backend.tp and hybrid shard fit the ranks
    _check(b.dist_backend in ("auto", "nccl", "gloo"), "backend.dist_backend",
           f"unknown process-group backend {b.dist_backend!r} (auto | nccl | gloo)")
    r = str(cfg.resume)
    _check(r in ("auto", "none") or os.path.isdir(r), "resume",
           f"must be auto, none or an existing checkpoint directory, got {r!r}")
    init = str(cfg.init_from) if cfg.init_from is not None else None
    _check(init is None or os.path.isdir(init.removeprefix("hf:")), "init_from",
           f"{'Hugging Face' if init and init.startswith('hf:') else 'checkpoint'} directory not found: {init!r}")
    tp = cfg.tokenizer.path
    _check(tp is None or os.path.isfile(str(tp)), "tokenizer.path", f"file not found: {tp!r}")
    _check(cfg.tokenizer.vocab_size >= 300, "tokenizer.vocab_size",
           f"must be >= 300 (byte fallback needs 256 ids), got {cfg.tokenizer.vocab_size}")


def validate_deepspeed(cfg: Any) -> None:
    """backend=deepspeed: a launcher must have started the process, and a user's
    backend.ds_config must agree with kiln's own keys. The rules belong to the DeepSpeed
    backend (train/backends/deepspeed.py: check_start); they run here, before any heavy work."""
    if cfg.backend.name == "deepspeed":
        from train.backends.deepspeed import check_start

        check_start(cfg)


def exit_config_error(cfg: Any, e: ConfigError) -> None:
    """End a launch on a config error: the message names the key, exit status 2. A failed
    start changes nothing on disk: a run directory this launch created is removed again,
    and one that existed before is left as it was (train/run_dir.py)."""
    import sys

    from train.run_dir import discard_failed_start

    print(str(e), file=sys.stderr, flush=True)
    discard_failed_start()
    sys.exit(2)


def validate_or_exit(cfg: Any) -> None:
    """For launch scripts: a bad config ends the process with the key named, before any work."""
    try:
        validate(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
