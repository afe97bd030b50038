"""The one training loop, for every backend and every task (pretraining, SFT, classification, DPO, reward,
RLHF).

Per optimizer step the loop takes this rank's ``grad_accum_steps`` micro-batches, counts
their loss tokens (targets that are not -100, or a batch's own ``loss_tokens``), and
all-reduces that count across data-parallel ranks. Each micro-batch's mean loss is then
weighted by its share of the global count, so the step's gradient is the gradient of the
sum of token losses divided by the number of loss tokens in the whole global batch --
whatever the micro-batch size, accumulation or world size. (Backends average gradients
over ranks, hence the factor ``data_parallel_size`` in the weight.) For pretraining every
micro-batch holds the same number of tokens and the weight is exactly 1/accumulation, the
same arithmetic as a plain mean. ``backend.step`` then clips and applies AdamW at the
scheduled learning rate. A task that owns its step (``Task.owns_step``: on-policy RL, a
rollout and then several minibatch steps) runs it instead, through the same backend.

What is trained -- tokenizer, model, data, the loss of a micro-batch, evaluation metrics,
checkpoint contents -- is the job's ``Task`` (``train/tasks/base.py`` says when the loop
calls which hook; ``train/tasks/`` holds pretraining, SFT, classification, DPO, reward, RL);
the loop itself is shared. ``Trainer(cfg)`` pretrains. ``fit`` is a few named steps:
``_start`` (resume, header, logger), ``_train_step`` (one optimizer step), ``_after_step``
(logging, evaluation, checkpoint, stop) and ``_finish``. Checkpoints hold everything needed
to continue as if nothing had happened: weights, optimizer, step, tokens, the data stream
position of every rank, every RNG, and the task's own pieces.
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

from data_pipeline.report import write_report
from data_pipeline.stream import document_inputs
from model.llama import flops_per_token, generate, param_count, uses_flex
from train import checkpoint as ckpt
from train import run_lock
from train.activation_checkpointing import apply_activation_checkpointing
from train.backends import build_backend
from train.checkpoint.manager import CheckpointManager
from train.checkpoint.rng import RNGStates
from train.checkpoint.state import FilePiece, Progress
from train.compile import compile_blocks
from train.data import DataPosition, pipeline_steps
from train.errors import ConfigError
from train.log import logger as log
from train.log import setup as log_setup
from train.metrics import MetricsLogger, peak_flops, peak_memory_gb
from train.optim import lr_at
from train.run_dir import record_run_config
from train.tasks.base import Task
from train.tasks.pretrain import PretrainTask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """The one loop. ``task`` (train/tasks/base.py) says what is trained; None: pretraining."""

    def __init__(self, cfg, task: Optional[Task] = None):
        self.cfg = cfg
        self.task = task if task is not None else PretrainTask(cfg)
        self.task.attach(self)
        self.backend = build_backend(cfg)
        b = self.backend
        log_setup(b.rank)
        seed_everything(cfg.train.seed)
        self.run_dir = cfg.run_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self._take_run_lock()
        self.ckpt_root = cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.checkpoints = CheckpointManager(b, self.ckpt_root, str(cfg.checkpoint.verify),
                                             int(cfg.checkpoint.keep_last), bool(cfg.checkpoint.async_save))
        self.logger = None  # the run's MetricsLogger while fit() runs
        self.last_checkpoint: Optional[str] = None  # written or resumed from by this process
        self.rollbacks = 0
        self.state = Progress()  # step, tokens, global batches skipped (train.nan_policy=rollback)
        self._stop_requested = False
        # A job scheduler asks for a stop by creating this file (slurm/common.sh does on USR1/TERM).
        self._stop_file = os.environ.get("KILN_STOP_FILE") or None
        self._build_model()
        self.use_bf16 = b.bf16
        dp = b.data_parallel_size
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.train_batches, self.val_batches = self.task.build_data()
        self._track_checkpoint_pieces()
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.peak = peak_flops(b.device, cfg.train.peak_tflops)

    # -- set-up steps -------------------------------------------------------------------------
    def _take_run_lock(self) -> None:
        """One kiln process per run directory: rank 0 takes the lock for the life of the
        process (train/run_lock.py); a live holder is a config error (exit 2) on every rank."""
        b = self.backend
        self.run_lock, lock_error = None, None
        if b.is_main:
            try:
                self.run_lock = run_lock.acquire(self.run_dir)
            except run_lock.RunLockError as e:
                lock_error = e.detail
        lock_error = b.broadcast_object(lock_error)
        if lock_error is not None:
            raise run_lock.RunLockError(lock_error)

    def _build_model(self) -> None:
        """Tokenizer, architecture, the task's records, then the model, set up on the backend
        with its starting weights."""
        cfg, task = self.cfg, self.task
        self.tokenizer = task.build_tokenizer()
        self.model_cfg = task.build_model_config()
        task.load_data()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = task.build_model()
        self.provenance = self.weights_provenance(model)  # before sharding: whole parameter counts
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.train.compile:
            compile_blocks(model, self.backend.compile_outside_hooks)
        self.backend.setup(model)
        task.load_initial_weights()

    def _track_checkpoint_pieces(self) -> None:
        """What a checkpoint holds: the task's weights (and optimizer) piece; progress, data
        position, RNG and the task's own small pieces in trainer_state.json; run files."""
        b = self.backend
        pieces = {"progress": self.state, "rng": RNGStates(b)}
        if self.train_batches is not None:  # a task that reads no micro-batches keeps its own position
            pieces["data"] = DataPosition(self.train_batches, b)
        extra = self.task.checkpoint_pieces()
        clash = sorted(set(extra) & set(pieces))
        if clash:
            raise ValueError(f"task {self.task.name}: checkpoint piece names {clash} are the loop's own")
        self.checkpoints.track(FilePiece(self.task.save_model_state, self.task.load_model_state),
                               {**pieces, **extra}, self.write_run_files)

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
        from model.quant import logical_numel  # a 4-bit (QLoRA) weight counts its values, not its packed bytes

        sizes = [(getattr(p, "ds_numel", logical_numel(p)), p.requires_grad) for p in model.parameters()]  # ZeRO-3: full
        total = sum(n for n, _ in sizes)
        trained = sum(n for n, grad in sizes if grad)
        return {**source, "parameters": total, "trainable_parameters": trained,
                "trainable_share": trained / max(total, 1)}

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
        self.task.write_extra_files(directory)

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
        """Whether packed sequences keep their documents apart: the task decides
        (pretraining: ``data.document_mask``; packed SFT rows: ``sft.packing``)."""
        return self.task.document_mask()

    def data_warning(self) -> Optional[str]:
        """Why this run's data may starve its accelerator (printed in the header), or None."""
        return self.task.data_warning()

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
                    out, loss = self.task.forward(model, x, y, extra)
                n = self.loss_tokens(batch)
                if n:
                    yield out, loss, n, y, extra
        finally:
            model.train()

    def evaluate(self) -> Optional[float]:
        """The validation loss the task computes (default: the token-weighted mean over every
        rank's validation batches), or None without validation batches."""
        return self.task.evaluate()

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
                    _, loss = self.task.forward(b.model, x, y, extra)
                if n == 0:  # nothing to learn here (loss is 0), but every rank must still run backward
                    b.backward(loss * 0.0)
                    continue
                # mean * n * dp / total; for equal micro-batches total / (n * dp) == accum exactly.
                b.backward(loss / (total / (n * dp)))
            loss_sum += loss.detach().float() * n
        return b.all_reduce_tensor(loss_sum) / total, total, total_inputs

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``train.max_steps`` (or a stop request); returns the run's result
        (losses, validation losses, final step, ...; the task's ``after_fit`` adds its own)."""
        result = self._start()
        if "final_step" not in result:  # else there was nothing to train
            window = _Window(self.state.step)
            while self.state.step < self.cfg.train.max_steps:
                lr = self._train_step(window)
                if self._after_step(window, lr, result):
                    break
            self._finish(result)
        self.task.after_fit(result)
        return result

    def _start(self) -> dict:
        """Before the first step: the task's preparation, the resume point loaded, the run
        directory's config recorded, the header, the metrics logger, evaluation at step 0."""
        cfg, b, t = self.cfg, self.backend, self.cfg.train
        self.task.before_fit()
        resumed = self.last_checkpoint = self.resume()
        if b.is_main:  # the start succeeded: only now is the run directory written (train/run_dir.py)
            record_run_config(cfg, self.run_dir)
            self._print_header(resumed)
        logger = self.logger = MetricsLogger(cfg, self.run_dir, b.is_main, t.max_steps, self.state.step)
        logger.log(self.state.step, {**self.provenance, "resumed_from": resumed}, kind="run")
        result = {"resumed_from": resumed, "start_step": self.state.step, "losses": {}, "val_losses": {}}
        if self.state.step >= t.max_steps:
            if b.is_main:
                log().info(f"run already at step {self.state.step} >= train.max_steps={t.max_steps}: nothing "
                           "to train. Raise train.max_steps, or start afresh with resume=none or another run_name.")
            self.logger = None
            logger.close()
            result["final_step"] = self.state.step
            return result
        if resumed is None and t.eval_every > 0:
            self._evaluate_and_log(0, result)
        b.model.train()
        return result

    def _train_step(self, window: _Window) -> float:
        """One optimizer step on the task's next micro-batches; returns its learning rate.
        The loss and grad norm stay on the device (in ``window``) until a step reads them."""
        cfg, t = self.cfg, self.cfg.train
        lr = lr_at(self.state.step, cfg.optim, t.max_steps)
        for _ in range(self.state.skipped_batches.get(self.state.step + 1, 0)):  # poisoned: see rollback()
            self.task.next_batches(t.grad_accum_steps)
        if self.task.owns_step:  # on-policy RL: a rollout, then minibatch steps (train/tasks/rl.py)
            loss, grad_norm, step_tokens = self.task.train_step(lr)
        else:
            micro_batches = self.task.next_batches(t.grad_accum_steps)
            loss, _, step_tokens = self.forward_backward(micro_batches)
            grad_norm = self.backend.step(lr, cfg.optim.grad_clip)
        self.state.step += 1
        self.state.tokens += step_tokens
        window.tokens += step_tokens
        window.pending.append((self.state.step, loss, grad_norm))
        return lr

    def _after_step(self, window: _Window, lr: float, result: dict) -> bool:
        """Logging, evaluation, checkpoint and stop after a step; True when the run stops."""
        cfg, t = self.cfg, self.cfg.train
        step = self.state.step
        log_now = step % t.log_every == 0 or step == t.max_steps
        eval_now = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.max_steps)
        save_now = step % cfg.checkpoint.every == 0 or step == t.max_steps
        stop_now = self.should_stop()
        # Losses are read at logging steps, and before anything that must not see a NaN
        # model: an evaluation, a checkpoint, a stop -- and the next step of a task that
        # samples from the model (on-policy RL cannot sample from NaN weights; its loss is
        # already on the host, so the read costs nothing).
        read_now = log_now or eval_now or save_now or stop_now or self.task.owns_step
        last = self._read_window(window, result) if read_now else ()
        if last is None:  # rolled back
            window.restart(self.state.step)
            return False
        if log_now:
            self._log_train(window, lr, last)
        t_pause = time.perf_counter()
        if eval_now:
            self._evaluate_and_log(step, result)
        if save_now:
            self.save()
            window.last_ckpt_step = step
        self.poll_save()
        window.paused += time.perf_counter() - t_pause
        if stop_now:
            if window.last_ckpt_step != step:
                self.save()
            self.finish_save()
            if self.backend.is_main:
                log().info(f"stop requested: checkpointed at step {step}")
            result["stopped"] = True
            return True
        return False

    def _read_window(self, window: _Window, result: dict) -> Optional[tuple[int, float, float]]:
        """Read the window's losses and norms (the one device sync of a logging step) into
        the result and the progress bar; returns the last (step, loss, grad norm), or None
        after a rollback because one was not finite."""
        steps, window.pending = window.pending, []
        values = [(s, float(loss), float(norm)) for s, loss, norm in steps]
        for s, loss_val, _ in values:
            if not math.isfinite(loss_val):
                self.rollback(loss_val, s)  # raises unless train.nan_policy=rollback allows another
                return None
            result["losses"][s] = loss_val
            self.logger.advance(1, loss_val)
        return values[-1]

    def _log_train(self, window: _Window, lr: float, last: tuple[int, float, float]) -> None:
        """The "train" record of a logging step: loss, lr, norm, throughput, memory, MFU and
        the task's own values; the window restarts."""
        b = self.backend
        if b.device.type == "cuda":
            torch.cuda.synchronize(b.device)
        dt = time.perf_counter() - window.t0 - window.paused
        tps = window.tokens / dt
        _, loss_val, norm_val = last
        metrics = {"loss": loss_val, "lr": lr, "grad_norm": norm_val, "tokens": float(self.state.tokens),
                   "tokens_per_s": tps, "tokens_per_s_per_device": tps / b.world_size,
                   "mem_gb": peak_memory_gb(b.device)}
        if self.peak and not self.task.owns_step:  # an RL step's FLOPs are not 6N per token trained
            metrics["mfu"] = self.flops_per_token * tps / b.world_size / self.peak
        metrics.update(self.task.train_metrics())
        self.logger.log(self.state.step, metrics)
        window.restart(window.last_ckpt_step)

    def _finish(self, result: dict) -> None:
        """After the last step: the save in flight committed, the logger closed, data workers
        stopped; rank 0 writes the data report and the plot."""
        cfg, b = self.cfg, self.backend
        self.finish_save()
        logger, self.logger = self.logger, None
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
            log().warning(f"loss is {loss_val} at step {bad_step}: rolled back to {self.last_checkpoint} (step "
                          f"{self.state.step}); {skipped[bad_step]} global batch(es) of step {bad_step} will be "
                          f"skipped (rollback {self.rollbacks} of at most {t.max_rollbacks})")

    def train_batches_epoch(self) -> int:
        packed = getattr(self.train_batches, "windows", None) or getattr(self.train_batches, "stream", None)
        return int(getattr(getattr(packed, "docs", None), "epoch", 0))

    def plot(self) -> Optional[str]:
        """The task's loss plot (rank 0)."""
        return self.task.plot()

    def _evaluate_and_log(self, step: int, result: dict) -> None:
        self.backend.agree("the number of validation batches (each is a forward with collectives under "
                           "FSDP / ZeRO-3)", len(self.val_batches))
        val = self.evaluate()
        extra = self.task.eval_metrics()
        if val is None and not extra:
            return
        metrics = {"val_loss": val, "val_ppl": math.exp(min(val, 50))} if val is not None else {}
        metrics.update(extra)
        self.logger.log(step, metrics, kind="eval")
        if val is not None:
            result["val_losses"][step] = val
        result.setdefault("eval_metrics", {})[step] = metrics

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
        """The run's header (rank 0): weights, model, backend, masking, batch."""
        out = log()
        cfg, b, mc = self.cfg, self.backend, self.model_cfg
        pv = self.provenance
        where = {"fresh init": f"fresh init (seed {pv.get('seed')})", "hf": f"Hugging Face directory {pv.get('path')}",
                 "kiln checkpoint": f"kiln checkpoint {pv.get('path')} (step {pv.get('step')})"}[pv["weights_from"]]
        out.info(f"starting weights: {where}; trainable parameters: {pv['trainable_parameters']:,} of "
              f"{pv['parameters']:,} ({pv['trainable_share']:.2%})")
        n = param_count(mc)
        out.info(f"model: {n / 1e6:.2f}M parameters ({param_count(mc, include_embeddings=False) / 1e6:.2f}M "
              f"without embeddings), d_model={mc.d_model} layers={mc.n_layers} heads={mc.n_heads}/{mc.kv_heads} "
              f"vocab={mc.vocab_size} seq_len={cfg.data.seq_len}")
        out.info(f"backend={b.name} ({cfg.backend.chosen_because}) world_size={b.world_size} device={b.device} "
              f"precision={'bf16' if self.use_bf16 else 'fp32'} compile={cfg.train.compile} "
              f"activation_checkpointing={cfg.train.activation_checkpointing}")
        masking = "off" if not self.document_mask() else \
            f"on ({'flex' if uses_flex(mc, b.device) else 'dense'})"
        out.info(f"document mask: {masking}")
        starving = self.data_warning()
        if starving:
            out.warning(starving)
        batch = self.task.batch_summary()
        out.info(batch or f"global batch = micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum_steps} "
                 f"x data-parallel {b.data_parallel_size} = {self.global_batch} sequences = "
                 f"{self.tokens_per_step:,} tokens/step; validation: {cfg.train.eval_sequences} held-out sequences "
                 f"at most, {len(self.val_batches)} batches per rank")
        if resumed:
            out.info(f"resumed from {resumed} at step {self.state.step}")


class _Window:
    """What ``fit`` carries between steps: the steps whose loss and norm are not read yet,
    and the logging window's start, tokens and paused seconds (evaluation, checkpointing:
    not training time)."""

    def __init__(self, last_ckpt_step: int):
        self.pending: list[tuple[int, torch.Tensor, object]] = []  # (step, loss, grad norm)
        self.last_ckpt_step = last_ckpt_step
        self.restart(last_ckpt_step)

    def restart(self, last_ckpt_step: int) -> None:
        self.t0, self.tokens, self.paused = time.perf_counter(), 0, 0.0
        self.last_ckpt_step = last_ckpt_step
