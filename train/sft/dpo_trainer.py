"""Preference optimisation (DPO / conservative DPO / IPO) through the one training loop.

``DPOTrainer`` is the SFT trainer with other data and another model class: pairs instead
of conversations (train/sft/preference.py), ``PreferencePolicy`` instead of the LM. The
reference log-probs are those of the starting weights: before training (and before a
resume loads trained weights) every rank runs the model as set up -- single, DDP, FSDP or
ZeRO-3, LoRA or not -- over every pair once, in the same order, so sharded backends run
the same collectives on every rank and no second model is ever held. With LoRA the
starting adapters are zero, so the reference is the base model. A resumed run recomputes
them from the same starting weights and continues exactly, or reads them from
``dpo.reference_cache``, which is used only when it was written for the same pairs and a
starting checkpoint with the same digest as the one at ``init_from`` now.

The loop weights each micro-batch's mean loss by its number of pairs, so the step's loss
is the mean over the global batch's pairs whatever the micro-batch, accumulation or world
size. Validation reports the loss and the implicit-reward accuracy and margin of the
held-out pairs (at step 0 they are those of the reference: accuracy 0, margin 0).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from train.data import GlobalBatchSlicer, shard_validation
from train.sft.preference import (
    PairStream,
    PreferencePolicy,
    RewardModel,
    collate_pairs,
    collate_reward,
    collate_with_reference,
    load_preference_data,
    reference_logprobs,
)
from train.sft.trainer import SFTTrainer


class DPOTrainer(SFTTrainer):
    def __init__(self, cfg):
        self.pref = None
        self._pref_metrics: dict = {}
        self.eval_history: list[dict] = []  # {step, reward_accuracy, reward_margin} per validation
        super().__init__(cfg)

    def load_task_data(self) -> None:
        self.pref = load_preference_data(self.cfg, self.tokenizer)

    def new_model(self, mc) -> torch.nn.Module:
        d = self.cfg.dpo
        return PreferencePolicy(mc, beta=float(d.beta), kind=str(d.loss), label_smoothing=float(d.label_smoothing))

    @torch.no_grad()
    def reference_pass(self, pairs) -> None:
        """Log-probs of every pair under the starting weights with any LoRA adapters off (the
        base), into ``pair.ref`` (all ranks, same order and batch sizes: sharded backends
        gather parameters inside each forward)."""
        model, micro, pad = self.backend.model, int(self.cfg.train.micro_batch_size), max(self.tokenizer.pad_id, 0)
        for lo in range(0, len(pairs), micro):
            chunk = pairs[lo:lo + micro]
            x, y, _ = self.model_inputs(collate_pairs(chunk, pad))
            with self.autocast():
                logps = reference_logprobs(model, {"input": x, "target": y}).double().cpu().tolist()
            for i, p in enumerate(chunk):
                p.ref = (logps[i], logps[len(chunk) + i])

    def init_identity(self) -> tuple[str, str]:
        """(digest, path) of the starting checkpoint as it is now (``adapters.init_digest``:
        a kiln checkpoint's manifest digest, an ``hf:`` directory's weight files' names, sizes
        and times)."""
        from train.sft.adapters import identify

        if getattr(self, "_init_identity", None) is None:
            self._init_identity = identify(self.init_dir or str(self.cfg.init_from))
        return self._init_identity

    def reference_fingerprint(self, pairs) -> str:
        """What the reference log-probs depend on: the starting weights (their digest, so a
        checkpoint retrained at the same path has another fingerprint) and the encoded pairs."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(self.init_identity()[0].encode())
        for p in pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
        return h.hexdigest()

    def reference_logps(self, pairs) -> None:
        """``reference_pass``, or its result read from ``dpo.reference_cache`` when that file
        was written for the same starting checkpoint (its stored ``init_digest`` equals the
        digest of the checkpoint now at init_from) and the same pairs (the fingerprint). A
        file written for another checkpoint or other pairs is not used: the pass runs, rank 0
        rewrites the file and says why, naming the stored digest and the current one. Every
        rank must agree on whether the file is used (the pass is collective)."""
        path = self.cfg.dpo.reference_cache
        key = self.reference_fingerprint(pairs) if path else None
        cached, stale = None, None
        if path and os.path.isfile(str(path)):
            with open(str(path)) as f:
                stored = json.load(f)
            digest, init = self.init_identity()
            if stored.get("init_digest") != digest:
                stale = (f"was written for the starting checkpoint {stored.get('init', '<not recorded>')} with digest "
                         f"{stored.get('init_digest', '<none: written before kiln recorded it>')}, but the starting "
                         f"checkpoint is now {init} with digest {digest} (retrained or replaced since)")
            elif stored.get("fingerprint") != key or len(stored.get("ref", [])) != len(pairs):
                stale = f"was written for other pairs (starting checkpoint digest {digest} as now)"
            else:
                cached = stored["ref"]
        if self.backend.agree(f"whether dpo.reference_cache={path} holds these pairs' log-probs", cached is not None):
            for p, ref in zip(pairs, cached):
                p.ref = (float(ref[0]), float(ref[1]))
            if self.backend.is_main:
                print(f"[kiln] reference log-probs read from {path} (starting checkpoint digest "
                      f"{self.init_identity()[0]})", flush=True)
            return
        if stale and self.backend.is_main:
            print(f"[kiln] dpo.reference_cache={path} {stale}: not used; recomputing the reference log-probs "
                  "and rewriting it", flush=True)
        self.reference_pass(pairs)
        if path and self.backend.is_main:
            digest, init = self.init_identity()
            os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"fingerprint": key, "init_digest": digest, "init": init,
                           "ref": [list(p.ref) for p in pairs]}, f)
            os.replace(tmp, str(path))

    def prepare_pairs(self) -> None:
        """Before the batches exist: the reference log-probs (DPO)."""
        self.reference_logps(self.pref.train + self.pref.val)

    def collate(self, pairs) -> dict:
        return collate_with_reference(pairs, max(self.tokenizer.pad_id, 0))

    def pair_scores(self, out: torch.Tensor, extra: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of a validation batch's model output: the implicit
        rewards beta * (log pi - log ref) for DPO."""
        beta, ref = float(self.cfg.dpo.beta), extra["ref_logps"].to(out.dtype)
        return beta * (out[:n] - ref[:n]), beta * (out[n:] - ref[n:])

    def document_mask(self) -> bool:
        """Preference pairs are never packed: one prompt and response per row."""
        return False

    def build_data(self):
        cfg, b, t = self.cfg, self.backend, self.cfg.train
        self.prepare_pairs()
        train = GlobalBatchSlicer(PairStream(self.pref.train, int(cfg.sft.seed)), t.micro_batch_size,
                                  t.grad_accum_steps, b.rank, b.data_parallel_size, collate_fn=self.collate)
        val = shard_validation(self.pref.val[: int(t.eval_sequences)], t.micro_batch_size, b.rank,
                               b.data_parallel_size, self.collate)
        return train, val

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if not self.val_batches:
            return None
        sums = torch.zeros(4, dtype=torch.float64)  # loss * pairs, pairs, correct, margin sum
        for out, loss, n, _, extra in self.validation_outputs():
            chosen, rejected = self.pair_scores(out, extra, n)
            sums += torch.tensor([float(loss) * n, n, float((chosen > rejected).sum()),
                                  float((chosen - rejected).sum())], dtype=torch.float64)
        loss_sum, count, correct, margin = self.backend.all_reduce_sum(sums.tolist())
        self._pref_metrics = {"reward_accuracy": correct / count, "reward_margin": margin / count}
        self.eval_history.append({"step": self.state.step, **self._pref_metrics})
        return loss_sum / count

    def extra_eval_metrics(self) -> dict:
        return dict(self._pref_metrics)


class RewardTrainer(DPOTrainer):
    """A Bradley-Terry reward model on the same pairs (``task=reward``, launch/reward.py): the
    SFT checkpoint with a scalar head on the last real token; validation reports pairwise
    accuracy (r_chosen > r_rejected) and the mean margin. The checkpoint is a kiln
    checkpoint whose weights are the LM's plus ``value.weight``."""

    def new_model(self, mc) -> torch.nn.Module:
        return RewardModel(mc, margin=float(self.cfg.dpo.margin))

    def prepare_pairs(self) -> None:
        """A reward model needs no reference."""

    def collate(self, pairs) -> dict:
        return collate_reward(pairs, max(self.tokenizer.pad_id, 0))

    def pair_scores(self, out: torch.Tensor, extra: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return out[:n], out[n:]  # the rewards themselves
