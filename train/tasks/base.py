"""The task interface: what one training job supplies to the one loop (``train/trainer.py``).

``Trainer`` owns everything every job shares -- the backend, the run directory and its
lock, checkpoints, the optimizer step, the token-weighted loss accumulation, logging,
evaluation scheduling, stop signals, NaN rollback. A ``Task`` owns what differs between
jobs: which tokenizer and architecture, which network (its model wrapper, from ``model/``),
which data, how a micro-batch becomes a loss, what evaluation reports, what else a
checkpoint holds. There is one ``Task`` per job (``train/tasks/``: pretrain, sft, classification,
preference (DPO), reward, rl (PPO and GRPO)), chosen by the launcher
(``train.tasks.for_config``) and handed to ``Trainer(cfg, task)``.

The order in which the loop calls a task (``Trainer.__init__`` then ``Trainer.fit``)::

    task.attach(trainer)               # the task may now read trainer.cfg / .backend
    task.build_tokenizer()             -> Tokenizer
    task.build_model_config()          -> ModelConfig         (tokenizer known)
    task.load_data()                   # records that need tokenizer + seq_len (labels,
                                       #   pairs, prompts); before the model: a classifier
                                       #   needs the number of labels
    task.build_model()                 -> nn.Module (before backend.setup)
    backend.setup(model)
    task.load_initial_weights()        # into the set-up backend (init_from)
    task.build_data()                  -> (train micro-batch iterator, validation batches)
    task.checkpoint_pieces()           -> {name: Stateful}: extra trainer_state.json fields
    fit():
      task.before_fit()                # before the resume point is loaded: e.g. the
                                       #   "before" generations of the SFT table
      per optimizer step:
        task.next_batches(n)           -> n micro-batches (dicts, see below)
        for each: task.forward(model, input, target, extra) -> (output, loss)
        backend.step(...)
          (an owns_step task instead: task.train_step(lr) -> (loss, grad norm, tokens))
        at logging steps: task.train_metrics() merged into the "train" record
        at evaluation steps: task.evaluate() -> loss or None; task.eval_metrics()
        at saves: task.save_model_state / task.write_extra_files (rank 0)
      task.plot()                      # rank 0, after the last step and save
      task.after_fit(result)           # report files, generations; may add to result

A micro-batch is a dict: ``input`` and ``target`` tensors; optional ``model_kwargs``
(tensors moved to the device and passed to ``forward`` as ``extra``); optional
``loss_tokens`` (the loss units it holds: pairs, examples; default: targets != -100) and
``tokens`` (inputs for throughput). The loop weights each micro-batch's mean loss by its
share of the global batch's loss units, so ``forward`` returns a *mean* over its units.

On-policy tasks (PPO, GRPO: ``train/tasks/rl.py``) are not a forward and backward over
micro-batches: one step samples a rollout batch from the policy, scores it and runs several
minibatch backend steps over it. Such a task sets ``owns_step`` and the loop calls its
``train_step(lr)`` instead of ``next_batches`` + ``forward`` + ``backend.step``; everything
else (checkpoints, resume, logging, evaluation scheduling, stop requests, rollback) is the
loop's as for any job. Its evaluation has no validation loss: ``evaluate`` returns None and
``eval_metrics`` holds what it measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from data_pipeline.tokenizer import Tokenizer
    from model.llama import ModelConfig
    from train.trainer import Trainer


class Task:
    """Defaults are the loop's generic behaviour; a task overrides what it changes. Hooks
    run on every rank unless they say otherwise (collectives inside them are fine as long
    as every rank calls them the same way)."""

    name = "task"
    owns_step = False  # True: the loop calls train_step for each optimizer step (on-policy tasks)

    def __init__(self, cfg):
        self.cfg = cfg
        self.trainer: Optional[Trainer] = None

    def attach(self, trainer: Trainer) -> None:
        """Called first by ``Trainer.__init__``: from here on the task reads the run through
        ``self.trainer`` (cfg, backend, tokenizer, model_cfg, autocast, model_inputs, state)."""
        self.trainer = trainer

    @property
    def backend(self):
        return self.trainer.backend

    # -- what is trained --------------------------------------------------------------------
    def build_tokenizer(self) -> Tokenizer:
        raise NotImplementedError

    def build_model_config(self) -> ModelConfig:
        raise NotImplementedError

    def load_data(self) -> None:
        """Read the task's records (tokenizer and ``model_cfg`` are known). Default: none."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def load_initial_weights(self) -> None:
        """Load starting weights into the set-up backend. Default: nothing (fresh init)."""

    def build_data(self):
        """(endless iterator of this rank's training micro-batches, list of this rank's
        validation micro-batches)."""
        raise NotImplementedError

    def checkpoint_pieces(self) -> dict:
        """Extra ``Stateful`` pieces for trainer_state.json (train/checkpoint/state.py), beside
        the loop's progress, data position and RNG. Default: none."""
        return {}

    def document_mask(self) -> bool:
        """Whether packed rows keep their documents apart (``doc_ids`` in a batch)."""
        return False

    def data_warning(self) -> Optional[str]:
        """Why this run's data may starve its accelerator (printed in the header), or None."""
        return None

    def batch_summary(self) -> Optional[str]:
        """The header's line on what one step trains on; None: micro-batch x accumulation x
        data-parallel ranks, and the validation batches."""
        return None

    # -- one optimizer step -------------------------------------------------------------------
    def next_batches(self, n: int) -> list[dict]:
        """This step's ``n`` micro-batches (n = train.grad_accum_steps). Default: the next
        ``n`` of the training iterator. An ``owns_step`` task drops one step's data here (the
        loop calls it for a step a NaN rollback skips)."""
        return [next(self.trainer.train_batches) for _ in range(n)]

    def train_step(self, lr: float) -> tuple[torch.Tensor, object, int]:
        """``owns_step`` tasks: one whole step at learning rate ``lr`` through the backend
        (every rank); returns (loss, gradient norm, input tokens over every rank)."""
        raise NotImplementedError

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, extra: dict) -> tuple[object, torch.Tensor]:
        """(output, mean loss) of one micro-batch on the device. Default: the model's own
        ``(output, loss) = model(x, y, **extra)``."""
        return model(x, y, **extra)

    def train_metrics(self) -> dict:
        """Task values added to the "train" record at logging steps (floats). Default: none."""
        return {}

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Validation loss: the token-weighted mean over every rank's validation batches."""
        t = self.trainer
        if not t.val_batches:
            return None
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=t.backend.device), 0
        for _, loss, n, _, _ in t.validation_outputs():
            loss_sum += loss.detach().double() * n
            count += n
        (count,) = t.backend.all_reduce_sum([count])
        return float(t.backend.all_reduce_tensor(loss_sum)) / count

    def eval_metrics(self) -> dict:
        """Task metrics logged beside the validation loss of the last ``evaluate``."""
        return {}

    # -- checkpoints ------------------------------------------------------------------------------
    def save_model_state(self, directory: str, background: bool = False):
        """Weights and optimizer into a checkpoint being written (all ranks); returns the
        backend's ``Writing``."""
        return self.backend.save(directory, background)

    def load_model_state(self, directory: str, meta: dict) -> None:
        self.backend.load(directory, meta)

    def write_extra_files(self, directory: str) -> None:
        """Rank 0 adds task files (chat template, adapter config, labels) to a checkpoint."""

    # -- around the loop ---------------------------------------------------------------------------
    def before_fit(self) -> None:
        """First thing in ``fit``, before a resume point is loaded: the weights are still
        the starting ones (all ranks)."""

    def after_fit(self, result: dict) -> None:
        """After the last step and save (all ranks): task reports, added to ``result``."""

    def plot(self) -> Optional[str]:
        """The loss plot (rank 0); returns its path."""
        return None

    def data_summary(self) -> Optional[tuple[str, object]]:
        """(label, object with ``counts`` and ``skipped``) of the records read, for the
        launcher's report; None when the task reads none."""
        return None
