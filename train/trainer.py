"""The one training loop, for every backend and every task (pretraining, SFT, classification).

Per optimizer step the loop takes this rank's ``grad_accum_steps`` micro-batches, counts
their loss tokens (targets that are not -100, or a batch's own ``loss_tokens``), and
all-reduces that count across data-parallel ranks. Each micro-batch's mean loss is then
weighted by its share of the global count, so the step's gradient is the gradient of the
sum of token losses divided by the number of loss tokens in the whole global batch --
whatever the micro-batch size, accumulation or world size. (Backends average gradients
over ranks, hence the factor ``data_parallel_size`` in the weight.) For pretraining every
micro-batch holds the same number of tokens and the weight is exactly 1/accumulation, the
same arithmetic as a plain mean. ``backend.step`` then clips and applies AdamW at the
scheduled learning rate.

Subclasses (``train/sft/trainer.py``) change what is built -- tokenizer, model, data,
checkpoint contents -- through the ``build_*`` and ``*_model_state`` hooks; the loop
itself is shared. Checkpoints hold everything needed to continue as if nothing had
happened: weights, optimizer, step, tokens, the data stream position of every rank, and
every RNG.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from data_pipeline import pipeline as data
from data_pipeline.report import write_report
from data_pipeline.stream import document_inputs
from data_pipeline.token_shards import file_digest
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from model import hf_interop
from model.llama import ModelConfig, Transformer, flops_per_token, generate, param_count, uses_flex
from train import checkpoint as ckpt
from train import run_lock
from train.activation_checkpointing import apply_activation_checkpointing
from train.backends import build_backend
from train.backends.base import RanksDisagree
from train.checkpoint.full_state import FullState, read_init_weights
from train.checkpoint.manager import CheckpointManager
from train.checkpoint.rng import RNGStates
from train.checkpoint.state import FilePiece, Progress
from train.compile import compile_blocks
from train.config import ConfigError
from train.data import DataPosition, build_train_stream, pipeline_steps, starvation_warning, validation_batches
from train.metrics import MetricsLogger, peak_flops, peak_memory_gb, plot_losses
from train.optim import lr_at
from train.run_dir import record_run_config
from train.sharded_init import build_on_device, builds_deferred, deferred


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ensure_tokenizer(cfg, backend) -> Tokenizer:
    """The configured tokenizer, or one trained on the training split and cached in run_dir.

    Every rank must end up with the same file: rank 0 trains it while the others wait, then
    all ranks compare its digest, so a failed training run or a run_dir that another node
    cannot see stops every rank with a message instead of a collective timeout."""
    if data.is_token_data(cfg.data):  # tokenized shards fix the tokenizer: theirs, or a configured equal one
        path = _token_data_tokenizer(cfg)
    elif cfg.tokenizer.path:
        path = str(cfg.tokenizer.path)
    elif _hf_init_dir(cfg):  # an imported HF model brings its tokenizer (SentencePiece only)
        try:
            path = hf_interop.hf_sentencepiece_path(_hf_init_dir(cfg))
        except FileNotFoundError as e:
            raise ConfigError("init_from", str(e)) from None
    else:
        path = os.path.join(cfg.run_dir, ckpt.TOKENIZER)
    error = None
    if backend.is_main and not os.path.exists(path):
        t0 = time.time()
        try:
            texts = data.iter_texts(cfg.data, cfg.tokenizer.train_max_docs)
            tok = train_tokenizer(texts, path, vocab_size=cfg.tokenizer.vocab_size)
            print(f"[kiln] trained tokenizer ({tok.vocab_size} pieces) in {time.time() - t0:.1f}s -> {path}",
                  flush=True)
        except Exception as e:  # told to the other ranks below, then raised here
            error = e
    backend.barrier()
    seen = f"training failed: {error}" if error else _file_digest(path)
    try:
        backend.agree(f"the tokenizer file {path} (its digest, or why a rank has none: a run_dir on a "
                      "file system the other nodes cannot see?)", seen)
    except RanksDisagree as disagreement:
        if error is not None:
            raise error from disagreement
        raise
    if error is not None:
        raise error
    return Tokenizer(path)


def _file_digest(path: str) -> str:
    return file_digest(path) if os.path.isfile(path) else "missing"


def _token_data_tokenizer(cfg) -> str:
    """The tokenizer of tokenized-shard sources: ``tokenizer.path`` if set, else the copy the
    shards carry; either way it must be the one every shard was written with."""
    shards = data.token_shards(cfg.data)
    path = str(cfg.tokenizer.path) if cfg.tokenizer.path else shards[0].tokenizer_path
    if path is None:
        raise ConfigError("tokenizer.path", f"the token shards {shards[0].files[0]}... carry no tokenizer.model; "
                          "set tokenizer.path to the tokenizer they were written with")
    digest = file_digest(path)
    for sh in shards:
        if sh.tokenizer_digest != digest:
            raise ConfigError("tokenizer.path", f"{path} (digest {digest}) is not the tokenizer the token shards "
                              f"{sh.files[0]}... were written with (digest {sh.tokenizer_digest}, "
                              f"{sh.tokenizer_path or 'no copy beside them'})")
    return path


def resolve_model_config(cfg, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with ``vocab_size`` taken from the tokenizer when unset.

    Rounded up to a multiple of 64 so the embedding and output matmuls hit tensor-core
    friendly shapes; the extra rows are never produced by the tokenizer.
    """
    if _hf_init_dir(cfg):  # the architecture is the HF model's; only kiln-only knobs come from cfg.model
        try:
            mc = hf_interop.model_config_from_hf(hf_interop.read_hf_config(_hf_init_dir(cfg)),
                                                 dropout=cfg.model.dropout)
        except hf_interop.UnsupportedModelError as e:
            raise ConfigError("init_from", str(e)) from None
        if cfg.data.seq_len > mc.max_seq_len:
            raise ConfigError("data.seq_len", f"{cfg.data.seq_len} exceeds the imported model's "
                              f"max_position_embeddings={mc.max_seq_len}")
    else:
        mc = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    if mc.vocab_size is None:
        mc.vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)
    elif mc.vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", f"{mc.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} pieces ({tokenizer.path})")
    return mc


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.backend = build_backend(cfg)
        b = self.backend
        seed_everything(cfg.train.seed)
        self.run_dir = cfg.run_dir
        os.makedirs(self.run_dir, exist_ok=True)
        # One kiln process per run directory: rank 0 takes the lock for the life of the
        # process (train/run_lock.py); a live holder is a config error (exit 2) on every rank.
        self.run_lock, lock_error = None, None
        if b.is_main:
            try:
                self.run_lock = run_lock.acquire(self.run_dir)
            except run_lock.RunLockError as e:
                lock_error = e.detail
        lock_error = b.broadcast_object(lock_error)
        if lock_error is not None:
            raise run_lock.RunLockError(lock_error)
        self.ckpt_root = cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.checkpoints = CheckpointManager(b, self.ckpt_root, str(cfg.checkpoint.verify),
                                             int(cfg.checkpoint.keep_last), bool(cfg.checkpoint.async_save))
        self.logger = None  # the run's MetricsLogger while fit() runs
        self.last_checkpoint: Optional[str] = None  # written or resumed from by this process
        self.rollbacks = 0
        self.tokenizer = self.build_tokenizer()
        self.model_cfg = self.build_model_config()
        self.state = Progress()  # step, tokens, global batches skipped (train.nan_policy=rollback)
        self._stop_requested = False
        # A job scheduler asks for a stop by creating this file (slurm/common.sh does on USR1/TERM).
        self._stop_file = os.environ.get("KILN_STOP_FILE") or None

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = self.build_model()
        self.provenance = self.weights_provenance(model)  # before sharding: whole parameter counts
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.train.compile:
            compile_blocks(model)
        b.setup(model)
        self.load_initial_weights()

        self.use_bf16 = b.bf16
        dp = b.data_parallel_size
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.train_batches, self.val_batches = self.build_data()
        self.checkpoints.track(FilePiece(self.save_model_state, self.load_model_state),
                               {"progress": self.state, "data": DataPosition(self.train_batches, b),
                                "rng": RNGStates(b)},
                               self.write_run_files)
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.peak = peak_flops(b.device, cfg.train.peak_tflops)

    # -- what is trained: hooks for subclasses ----------------------------------------------
    def build_tokenizer(self) -> Tokenizer:
        return ensure_tokenizer(self.cfg, self.backend)

    def build_model_config(self) -> ModelConfig:
        return resolve_model_config(self.cfg, self.tokenizer)

    def build_model(self) -> torch.nn.Module:
        """The Transformer; where the backend shards it, built without weights (each rank
        initialises its own shard in ``backend.setup``), else built and initialised on the
        training device (train/sharded_init.py)."""
        if not builds_deferred(self.backend):
            return build_on_device(Transformer, self.model_cfg, self.backend.device)
        with deferred(self.backend):
            return Transformer(self.model_cfg, init_weights=False)

    def load_initial_weights(self) -> None:
        """``init_from`` weights, read once on rank 0 and streamed into the set-up backend."""
        if self.cfg.init_from:
            b, path = self.backend, str(self.cfg.init_from)
            b.import_full(b.on_main(f"reading init_from={path}",
                                    lambda: FullState(model=read_init_weights(
                                        path, self.model_cfg, str(self.cfg.checkpoint.verify)))))

    def build_data(self):
        """(endless training micro-batches of this rank, list of validation micro-batches)."""
        cfg, b = self.cfg, self.backend
        dp = b.data_parallel_size
        train = build_train_stream(cfg, self.tokenizer, b.rank, dp)
        val = validation_batches(cfg, self.tokenizer, b.rank, dp)
        return train, val

    def weights_provenance(self, model: torch.nn.Module) -> dict:
        """Where the starting weights came from, and how many parameters train: printed at
        start, written to metrics.jsonl (kind "run") and to every checkpoint's meta.json."""
        init = str(self.cfg.init_from) if self.cfg.init_from else ""
        if init.startswith("hf:"):
            source = {"weights_from": "hf", "path": os.path.abspath(init[3:])}
        elif init:
            step_dir = ckpt.resolve(init, "off")
            source = {"weights_from": "kiln checkpoint", "path": step_dir, "step": ckpt.read_meta(step_dir).get("step")}
            if os.path.isfile(os.path.join(step_dir, ckpt.META)):  # a weights directory has no manifest
                source["digest"] = ckpt.digest(step_dir)
        else:
            source = {"weights_from": "fresh init", "seed": int(self.cfg.train.seed)}
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: full
        total = sum(n for n, _ in sizes)
        trained = sum(n for n, grad in sizes if grad)
        return {**source, "parameters": total, "trainable_parameters": trained,
                "trainable_share": trained / max(total, 1)}

    def save_model_state(self, directory: str, background: bool = False):
        """Weights and optimizer into a checkpoint being written (all ranks call); returns
        the backend's ``Writing``."""
        return self.backend.save(directory, background)

    def load_model_state(self, directory: str, meta: dict) -> None:
        self.backend.load(directory, meta)

    def write_extra_files(self, directory: str) -> None:
        """Rank 0 adds task files (chat template, adapter config, ...) to a checkpoint."""

    # -- checkpoints ----------------------------------------------------------------------
    def resume(self) -> Optional[str]:
        """Continue from ``resume`` (auto: the newest checkpoint that verifies, every rank
        hashing its share), after checking that this run's settings fit what it holds."""
        b = self.backend
        path = self.checkpoints.resume_point(str(self.cfg.resume))
        b.agree("whether the checkpoint to resume from is visible (is checkpoint.dir on a file system every "
                "node sees?)", path is None or os.path.isdir(path))
        if path is None:
            return None
        self.check_resume_compatible(path)
        self.load_checkpoint(path)
        return path

    def check_resume_compatible(self, path: str) -> None:
        """A resume continues the saved state, so a setting that changes what that state
        means (the model's shape, the sequence length its data position counts in) is a
        config error naming the key, before anything is loaded."""
        advice = (f"Give this run its own directory (run_name=... or run_dir=...) and start it from these weights "
                  f"with init_from={path}, or start afresh here with resume=none (its checkpoints then replace these).")
        theirs, ours = ckpt.read_model_config(path).shape(), self.model_cfg.shape()
        changed = [k for k in ours if theirs.get(k) != ours[k]]
        if changed:  # e.g. a new model=... in a run directory that holds another model
            diff = ", ".join(f"{k}={theirs.get(k)} (this run: {ours[k]})" for k in changed)
            raise ConfigError(f"model.{changed[0]}", f"resume={self.cfg.resume}: {path} holds a different model "
                              f"({diff}). {advice}")
        if ckpt.CONFIG in ckpt.listed(path):
            saved = ckpt.read_yaml(os.path.join(path, ckpt.CONFIG)).get("data", {})
            seq_len = saved.get("seq_len") if isinstance(saved, dict) else None
            if seq_len is not None and seq_len != self.cfg.data.seq_len:
                raise ConfigError("data.seq_len", f"resume={self.cfg.resume}: {path} was trained with "
                                  f"data.seq_len={seq_len} (this run: {self.cfg.data.seq_len}); its data position "
                                  f"and schedule count in those windows. {advice}")

    def load_checkpoint(self, path: str) -> None:
        """Everything of a (verified) checkpoint into this trainer: weights, optimizer, step,
        data position, skipped batches, RNG (the pieces given to the manager)."""
        self.checkpoints.load(path)

    def save(self) -> Optional[str]:
        """Checkpoint the current step (every rank). Synchronous: returns the committed
        directory. ``checkpoint.async_save``: returns None once the state is copied out,
        and ``saved`` reports the commit later (``poll_save`` each step)."""
        b, cfg = self.backend, self.cfg
        self.finish_save()  # one save in flight at a time
        b.agree("the step being checkpointed", self.state.step)
        meta = {"backend": b.name, "zero_stage": int(cfg.backend.zero_stage), "world_size": b.world_size,
                "data_parallel_size": b.data_parallel_size, "tokens": self.state.tokens,
                "model": OmegaConf.to_container(OmegaConf.structured(self.model_cfg)), "provenance": self.provenance}
        self.checkpoints.start(self.state.step, meta)
        return None if cfg.checkpoint.async_save else self.finish_save()

    def write_run_files(self, directory: str) -> None:
        """Rank 0's files that describe the run, into a checkpoint being written."""
        OmegaConf.save(self.cfg, os.path.join(directory, ckpt.CONFIG), resolve=True)
        OmegaConf.save(OmegaConf.structured(self.model_cfg), os.path.join(directory, ckpt.MODEL_CONFIG))
        shutil.copyfile(self.tokenizer.path, os.path.join(directory, ckpt.TOKENIZER))
        self.write_extra_files(directory)

    def finish_save(self) -> Optional[str]:
        """Wait for the save in flight, if any, and report its commit."""
        return self.saved(self.checkpoints.wait())

    def poll_save(self) -> Optional[str]:
        """Commit the save in flight if every rank has finished writing it (one small
        collective per step while a save is in flight; none otherwise)."""
        return self.saved(self.checkpoints.poll())

    def saved(self, committed) -> Optional[str]:
        if committed is None:
            return None
        path, stats = committed
        self.last_checkpoint = path
        if self.backend.is_main and self.logger is not None:
            self.logger.log(stats["step"], {"checkpoint": path, **{k: v for k, v in stats.items() if k != "step"}},
                            kind="checkpoint")
        return path

    # -- evaluation -------------------------------------------------------------------------
    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.backend.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(input, target, extra forward kwargs) of a micro-batch on the training device.
        Extra kwargs (packing's doc_ids/position_ids, a classifier's last_index) come from
        the batch's ``model_kwargs``; a packed pretraining window gets its documents kept
        apart (``document_inputs``) unless ``data.document_mask=false``."""
        dev = self.backend.device

        def put(t: torch.Tensor) -> torch.Tensor:  # pinned first: a pageable copy would block the host
            return (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)

        kwargs = batch.get("model_kwargs")
        if kwargs is None and "doc_ids" in batch and self.document_mask():  # packed pretraining windows
            kwargs = document_inputs(batch["doc_ids"])
        extra = {k: put(v) for k, v in (kwargs or {}).items()}
        return put(batch["input"]), put(batch["target"]), extra

    def document_mask(self) -> bool:
        """Whether packed sequences keep their documents apart (``data.document_mask``)."""
        return bool(self.cfg.data.document_mask)

    def data_warning(self) -> Optional[str]:
        """Why this run's data may starve its accelerator (printed in the header), or None."""
        return starvation_warning(self.cfg, self.backend.device)

    @staticmethod
    def loss_tokens(batch: dict) -> int:
        if "loss_tokens" in batch:
            return int(batch["loss_tokens"])
        return int((batch["target"] != -100).sum())

    @torch.no_grad()
    def validation_outputs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, dict]]:
        """(output, loss, loss tokens, target, model kwargs) of each of this rank's validation
        batches, the model in eval mode. A padding batch (train/data.py: shard_validation)
        still runs its forward pass, which keeps the ranks' collectives in step under
        sharding, but is not yielded; for the same reason every rank must read the whole
        iterator (no early ``break``). Every evaluation (the LM loss, classification,
        preference rewards) reads its batches here."""
        model = self.backend.model
        model.eval()
        try:
            for batch in self.val_batches:
                x, y, extra = self.model_inputs(batch)
                with self.autocast():
                    out, loss = model(x, y, **extra)
                n = self.loss_tokens(batch)
                if n:
                    yield out, loss, n, y, extra
        finally:
            model.train()

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Validation loss: the token-weighted mean over every rank's validation batches."""
        if not self.val_batches:
            return None
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=self.backend.device), 0
        for _, loss, n, _, _ in self.validation_outputs():
            loss_sum += loss.detach().double() * n
            count += n
        (count,) = self.backend.all_reduce_sum([count])
        return float(self.backend.all_reduce_tensor(loss_sum)) / count

    def forward_backward(self, micro_batches: list[dict]) -> tuple[torch.Tensor, int, int]:
        """Accumulate the gradients of one optimizer step; returns (loss, global loss
        tokens, global input tokens). The loss is the token mean over the global batch, a
        0-dim tensor on the device: nothing here reads a device value back to the host
        (token counts come from the host-side batches, the all-reduce of the loss stays on
        the device), so the CPU can run ahead of the GPU until a logging step reads it."""
        b = self.backend
        dp = b.data_parallel_size
        local = [self.loss_tokens(mb) for mb in micro_batches]
        tokens = sum(int(mb.get("tokens", mb["input"].numel())) for mb in micro_batches)
        total, total_inputs = (int(v) for v in b.all_reduce_sum([sum(local), tokens]))
        if total == 0:
            raise ValueError(f"step {self.state.step + 1}: the global batch has no loss token")
        loss_sum = torch.zeros((), dtype=torch.float32, device=b.device)
        last = len(micro_batches) - 1
        for i, (batch, n) in enumerate(zip(micro_batches, local)):
            x, y, extra = self.model_inputs(batch)
            with b.micro_step_context(i == last):
                with self.autocast():
                    _, loss = self.backend.model(x, y, **extra)
                if n == 0:  # nothing to learn here (loss is 0), but every rank must still run backward
                    b.backward(loss * 0.0)
                    continue
                # mean * n * dp / total; for equal micro-batches total / (n * dp) == accum exactly.
                b.backward(loss / (total / (n * dp)))
            loss_sum += loss.detach().float() * n
        return b.all_reduce_tensor(loss_sum) / total, total, total_inputs

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, b, t = self.cfg, self.backend, self.cfg.train
        resumed = self.last_checkpoint = self.resume()
        if b.is_main:  # the start succeeded: only now is the run directory written (train/run_dir.py)
            record_run_config(cfg, self.run_dir)
        if b.is_main:
            self._print_header(resumed)
        logger = self.logger = MetricsLogger(cfg, self.run_dir, b.is_main, t.max_steps, self.state.step)
        logger.log(self.state.step, {**self.provenance, "resumed_from": resumed}, kind="run")
        result = {"resumed_from": resumed, "start_step": self.state.step, "losses": {}, "val_losses": {}}
        if self.state.step >= t.max_steps:
            if b.is_main:
                print(f"[kiln] run already at step {self.state.step} >= train.max_steps={t.max_steps}: nothing "
                      "to train. Raise train.max_steps, or start afresh with resume=none or another run_name.",
                      flush=True)
            logger.close()
            result["final_step"] = self.state.step
            return result
        if resumed is None and t.eval_every > 0:
            self._evaluate_and_log(0, logger, result)
        model = b.model
        model.train()
        window_t0, window_tokens = time.perf_counter(), 0
        paused = 0.0  # seconds of evaluation and checkpointing inside the window: not training time
        last_ckpt_step = self.state.step
        window: list[tuple[int, torch.Tensor, object]] = []  # (step, loss, grad norm) not read yet

        def read_window() -> Optional[tuple[int, float, float]]:
            """Read the window's losses and norms (the one device sync of a logging step) into
            the result and the progress bar; returns the last (step, loss, grad norm), or None
            after a rollback because one was not finite."""
            nonlocal window
            steps, window = window, []
            values = [(s, float(loss), float(norm)) for s, loss, norm in steps]
            for s, loss_val, _ in values:
                if not math.isfinite(loss_val):
                    self.rollback(loss_val, s)  # raises unless train.nan_policy=rollback allows another
                    return None
                result["losses"][s] = loss_val
                logger.advance(1, loss_val)
            return values[-1]

        while self.state.step < t.max_steps:
            lr = lr_at(self.state.step, cfg.optim, t.max_steps)
            for _ in range(self.state.skipped_batches.get(self.state.step + 1, 0)):  # poisoned: see rollback()
                [next(self.train_batches) for _ in range(t.grad_accum_steps)]
            micro_batches = [next(self.train_batches) for _ in range(t.grad_accum_steps)]
            loss, _, step_tokens = self.forward_backward(micro_batches)
            grad_norm = b.step(lr, cfg.optim.grad_clip)
            self.state.step += 1
            self.state.tokens += step_tokens
            window_tokens += step_tokens
            step = self.state.step
            window.append((step, loss, grad_norm))
            log_now = step % t.log_every == 0 or step == t.max_steps
            eval_now = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.max_steps)
            save_now = step % cfg.checkpoint.every == 0 or step == t.max_steps
            stop_now = self.should_stop()
            # Losses are read at logging steps, and before anything that must not see a NaN
            # model: an evaluation, a checkpoint, a stop.
            last = read_window() if log_now or eval_now or save_now or stop_now else ()
            if last is None:  # rolled back
                window_t0, window_tokens, paused = time.perf_counter(), 0, 0.0
                last_ckpt_step = self.state.step
                continue
            if log_now:
                if b.device.type == "cuda":
                    torch.cuda.synchronize(b.device)
                dt = time.perf_counter() - window_t0 - paused
                tps = window_tokens / dt
                _, loss_val, norm_val = last
                metrics = {"loss": loss_val, "lr": lr, "grad_norm": norm_val, "tokens": float(self.state.tokens),
                           "tokens_per_s": tps, "tokens_per_s_per_device": tps / b.world_size,
                           "mem_gb": peak_memory_gb(b.device)}
                if self.peak:
                    metrics["mfu"] = self.flops_per_token * tps / b.world_size / self.peak
                logger.log(step, metrics)
                window_t0, window_tokens, paused = time.perf_counter(), 0, 0.0
            t_pause = time.perf_counter()
            if eval_now:
                self._evaluate_and_log(step, logger, result)
            if save_now:
                self.save()
                last_ckpt_step = step
            self.poll_save()
            paused += time.perf_counter() - t_pause
            if stop_now:
                if last_ckpt_step != step:
                    self.save()
                self.finish_save()
                if b.is_main:
                    print(f"[kiln] stop requested: checkpointed at step {step}", flush=True)
                result["stopped"] = True
                break
        self.finish_save()
        self.logger = None
        logger.close()
        if hasattr(self.train_batches, "close"):  # background data workers
            self.train_batches.close()
        result["final_step"] = self.state.step
        result["tokens"] = self.state.tokens
        if b.is_main:
            steps = pipeline_steps(self.train_batches)
            if steps:
                report_dir = os.path.join(self.run_dir, "data_report")
                write_report(steps, report_dir, title=f"Data pipeline: training stream of rank 0 "
                             f"({self.train_batches_epoch()} full passes over the input)")
                result["data_report"] = os.path.join(report_dir, "report.md")
            result["plot"] = self.plot() if cfg.logger.plot else None
        return result

    def rollback(self, loss_val: float, bad_step: int) -> None:
        """A non-finite loss at ``bad_step`` (the first of the steps read since the last check;
        every checkpoint is written after such a check, so the last one predates it). ``train.nan_policy=raise``: stop, saying
        which checkpoint is where this stretch started. ``rollback``: reload that checkpoint
        (it was verified when written or resumed), record that the global batch of this step
        is skipped -- the count travels in later checkpoints, so a resumed run skips the same
        batches -- and continue; replaying the steps in between is exact."""
        self.finish_save()  # a save in flight predates the bad step: it becomes the rollback point
        t = self.cfg.train
        source = (f"the last checkpoint of this run, {self.last_checkpoint}, is untouched (resuming from it "
                  "repeats the same steps)" if self.last_checkpoint else "no checkpoint was written or resumed by "
                  "this run")
        if t.nan_policy != "rollback" or self.last_checkpoint is None or self.rollbacks >= t.max_rollbacks:
            why = "" if t.nan_policy != "rollback" else (
                " and there is no checkpoint to roll back to" if self.last_checkpoint is None
                else f" after {self.rollbacks} rollbacks (train.max_rollbacks={t.max_rollbacks})")
            raise FloatingPointError(f"loss is {loss_val} at step {bad_step}{why}; lower optim.lr or check the data, "
                                     f"or set train.nan_policy=rollback; {source}.")
        skipped = dict(self.state.skipped_batches)
        skipped[bad_step] = skipped.get(bad_step, 0) + 1
        self.load_checkpoint(self.last_checkpoint)
        self.state.skipped_batches = {**self.state.skipped_batches, **skipped}
        self.rollbacks += 1
        if self.backend.is_main:
            print(f"[kiln] loss is {loss_val} at step {bad_step}: rolled back to {self.last_checkpoint} (step "
                  f"{self.state.step}); {skipped[bad_step]} global batch(es) of step {bad_step} will be skipped "
                  f"(rollback {self.rollbacks} of at most {t.max_rollbacks})", flush=True)

    def train_batches_epoch(self) -> int:
        packed = getattr(self.train_batches, "windows", None) or getattr(self.train_batches, "stream", None)
        return int(getattr(getattr(packed, "docs", None), "epoch", 0))

    def plot(self) -> Optional[str]:
        return plot_losses(os.path.join(self.run_dir, "metrics.jsonl"), os.path.join(self.run_dir, "loss.png"),
                           title=f"kiln: {self.cfg.run_name}")

    def _evaluate_and_log(self, step: int, logger: MetricsLogger, result: dict) -> None:
        self.backend.agree("the number of validation batches (each is a forward with collectives under "
                           "FSDP / ZeRO-3)", len(self.val_batches))
        val = self.evaluate()
        if val is None:
            return
        metrics = {"val_loss": val, "val_ppl": math.exp(min(val, 50)), **self.extra_eval_metrics()}
        logger.log(step, metrics, kind="eval")
        result["val_losses"][step] = val
        result.setdefault("eval_metrics", {})[step] = metrics

    def extra_eval_metrics(self) -> dict:
        """Task metrics logged beside the validation loss (classification: accuracy, macro-F1)."""
        return {}

    def should_stop(self) -> bool:
        """True when the run must checkpoint and exit now: ``train.stop_at_step`` reached, or
        a stop requested on any rank, through ``request_stop`` (the signal handlers of
        ``stop_on_signals``) or the file named by ``$KILN_STOP_FILE``. Called by every rank
        after every step; the request is all-reduced so that all ranks stop at the same step."""
        stop_at = self.cfg.train.stop_at_step
        requested = self._stop_requested or bool(self._stop_file and os.path.exists(self._stop_file))
        requested = self.backend.all_reduce_mean(float(requested)) > 0
        return requested or (stop_at is not None and self.state.step >= stop_at)

    def request_stop(self) -> None:
        self._stop_requested = True

    def stop_on_signals(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
        """Make these signals request a stop: checkpoint after the current step, then return
        from ``fit`` (Slurm's time-limit warning, preemption, ``kill -USR1``)."""
        def handler(signum, frame):
            if not self._stop_requested:  # os.write: print() may not be re-entered from a handler
                os.write(2, f"[kiln] rank {self.backend.rank}: {signal.Signals(signum).name}: checkpointing after "
                            "this step, then stopping\n".encode())
            self.request_stop()

        for s in signals:
            signal.signal(s, handler)

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        model = self.backend.raw_model
        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.backend.device)
        g = torch.Generator(device=self.backend.device).manual_seed(seed)
        with self.autocast():
            out = generate(model, ids, max_new_tokens, temperature=0.8, top_k=40,
                           eos_id=self.tokenizer.eos_id, generator=g, device=self.backend.device)
        return prompt + self.tokenizer.decode(out[0].tolist())

    def _print_header(self, resumed: Optional[str]) -> None:
        cfg, b, mc = self.cfg, self.backend, self.model_cfg
        pv = self.provenance
        where = {"fresh init": f"fresh init (seed {pv.get('seed')})", "hf": f"Hugging Face directory {pv.get('path')}",
                 "kiln checkpoint": f"kiln checkpoint {pv.get('path')} (step {pv.get('step')})"}[pv["weights_from"]]
        print(f"[kiln] starting weights: {where}; trainable parameters: {pv['trainable_parameters']:,} of "
              f"{pv['parameters']:,} ({pv['trainable_share']:.2%})", flush=True)
        n = param_count(mc)
        print(f"[kiln] model: {n / 1e6:.2f}M parameters ({param_count(mc, include_embeddings=False) / 1e6:.2f}M "
              f"without embeddings), d_model={mc.d_model} layers={mc.n_layers} heads={mc.n_heads}/{mc.kv_heads} "
              f"vocab={mc.vocab_size} seq_len={cfg.data.seq_len}", flush=True)
        print(f"[kiln] backend={b.name} ({cfg.backend.chosen_because}) world_size={b.world_size} device={b.device} "
              f"precision={'bf16' if self.use_bf16 else 'fp32'} compile={cfg.train.compile} "
              f"activation_checkpointing={cfg.train.activation_checkpointing}", flush=True)
        masking = "off" if not self.document_mask() else \
            f"on ({'flex' if uses_flex(mc, b.device) else 'dense'})"
        print(f"[kiln] document mask: {masking}", flush=True)
        starving = self.data_warning()
        if starving:
            print(f"[kiln] warning: {starving}", flush=True)
        print(f"[kiln] global batch = micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum_steps} "
              f"x data-parallel {b.data_parallel_size} = {self.global_batch} sequences = {self.tokens_per_step:,} "
              f"tokens/step; validation: {cfg.train.eval_sequences} held-out sequences at most, "
              f"{len(self.val_batches)} batches per rank", flush=True)
        if resumed:
            print(f"[kiln] resumed from {resumed} at step {self.state.step}", flush=True)


def _hf_init_dir(cfg) -> str | None:
    """The local directory of ``init_from=hf:<dir>``, else None."""
    init = str(cfg.init_from) if cfg.init_from else ""
    return init[3:] if init.startswith("hf:") else None
