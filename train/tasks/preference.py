"""Preference pairs through the one loop: DPO / conservative DPO / IPO (launch/dpo.py) and a
Bradley-Terry reward model (launch/reward.py).

Both read the same pairs (train/sft/preference.py: ``load_preference_data``) and evaluate the
same way -- held-out loss, the share of pairs whose chosen score beats the rejected one
(``reward_accuracy``) and the mean difference (``reward_margin``) -- through the helpers
below; they differ in the network, the batches and the score.

``PreferenceTask`` (DPO): the policy is the plain LM; ``forward`` turns its logits into
sequence log-probs of the replies and the loss (``dpo.loss``; IPO on log-probs averaged per
reply token unless ``dpo.ipo_logps=sum``). The reference log-probs are those of the starting
weights: before training (and before a resume loads trained weights: the pass runs while
the task's data is built, in ``Trainer.__init__``) every rank runs the model as set up --
single, DDP, FSDP or ZeRO-3, LoRA or not -- over every pair once, in the same order, so
sharded backends run the same collectives on every rank and no second model is ever held.
With LoRA the reference is the base model with the adapters off. A resumed run recomputes
them from the same starting weights and continues exactly, or reads them from
``dpo.reference_cache``, which is used only when it was written for the same pairs and a
starting checkpoint with the same digest as the one at ``init_from`` now.

The loop weights each micro-batch's mean loss by its number of pairs, so the step's loss
is the mean over the global batch's pairs whatever the micro-batch, accumulation or world
size. At step 0 the policy is the reference: every h = 0, so the DPO loss is ln 2 (IPO:
1 / (4 beta^2)) and the margin 0 up to float noise. The accuracy at step 0 is not
determined: it counts pairs whose margin is above 0, and the policy's log-probs (batched
with the rest of the step) differ from the reference pass's by float rounding, either way.

``RewardTask``: ``RewardModel`` (model/reward.py), the checkpoint's network with a scalar
head on the last real token of prompt + reply; no reference; the score is the reward.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from model.llama import ModelConfig
from model.reward import RewardModel
from train.data import GlobalBatchSlicer, shard_validation
from train.log import logger as log
from train.sft.preference import (
    PairStream,
    collate_pairs,
    collate_reward,
    collate_with_reference,
    load_preference_data,
    loss_logprobs,
    preference_loss_only,
    reference_logprobs,
    sequence_logprobs,
)
from train.tasks.finetune import FinetuneTask


class _PairsTask(FinetuneTask):
    """What DPO and the reward model share: the pairs, their batches, the pairwise evaluation."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pairs = None  # train.sft.preference.PreferenceData once loaded
        self.metrics: dict = {}  # the last evaluation's reward_accuracy / reward_margin
        self.eval_history: list[dict] = []  # {step, reward_accuracy, reward_margin} per evaluation

    def load_data(self) -> None:
        self.pairs = load_preference_data(self.cfg, self.trainer.tokenizer)

    def data_summary(self):
        return ("preference data", self.pairs)

    def collate(self, pairs) -> dict:
        raise NotImplementedError

    def prepare_pairs(self) -> None:
        """Before the batches exist (DPO: the reference log-probs)."""

    def build_data(self):
        cfg, b, t = self.cfg, self.backend, self.cfg.train
        self.prepare_pairs()
        train = GlobalBatchSlicer(PairStream(self.pairs.train, int(cfg.sft.seed)), t.micro_batch_size,
                                  t.grad_accum_steps, b.rank, b.data_parallel_size, collate_fn=self.collate)
        val = shard_validation(self.pairs.val[: int(t.eval_sequences)], t.micro_batch_size, b.rank,
                               b.data_parallel_size, self.collate)
        return train, val

    def pair_scores(self, out, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of a validation batch's ``forward`` output."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if not self.trainer.val_batches:
            return None
        sums = torch.zeros(4, dtype=torch.float64)  # loss * pairs, pairs, correct, margin sum
        for out, loss, n, _, _ in self.trainer.validation_outputs():
            chosen, rejected = self.pair_scores(out, n)
            sums += torch.tensor([float(loss) * n, n, float((chosen > rejected).sum()),
                                  float((chosen - rejected).sum())], dtype=torch.float64)
        loss_sum, count, correct, margin = self.backend.all_reduce_sum(sums.tolist())
        self.metrics = {"reward_accuracy": correct / count, "reward_margin": margin / count}
        self.eval_history.append({"step": self.trainer.state.step, **self.metrics})
        return loss_sum / count

    def eval_metrics(self) -> dict:
        return dict(self.metrics)


class PreferenceTask(_PairsTask):
    """DPO / cDPO / IPO against the starting weights as reference (``task=preference``)."""

    name = "preference"

    def eval_prompts(self) -> list[str]:
        return list(self.cfg.eval.prompts)

    def collate(self, pairs) -> dict:
        return collate_with_reference(pairs, max(self.trainer.tokenizer.pad_id, 0))

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, extra: dict):
        """Rows are chosen then rejected. Returns ((2, B) detached policy and reference
        log-probs as the loss compares them, mean loss over the pairs)."""
        d = self.cfg.dpo
        logits, _ = model(x)
        kind, mode = str(d.loss), str(d.ipo_logps)
        logps = loss_logprobs(sequence_logprobs(logits, y), y, kind, mode)
        ref = loss_logprobs(extra["ref_logps"].to(logps.dtype), y, kind, mode)
        half = len(x) // 2
        loss = preference_loss_only(logps[:half], logps[half:], ref[:half], ref[half:], float(d.beta), kind,
                                    float(d.label_smoothing))
        return torch.stack([logps.detach(), ref]), loss

    def pair_scores(self, out, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The implicit rewards beta * (log pi - log ref)."""
        beta = float(self.cfg.dpo.beta)
        logps, ref = out
        return beta * (logps[:n] - ref[:n]), beta * (logps[n:] - ref[n:])

    def prepare_pairs(self) -> None:
        self.reference_logps(self.pairs.train + self.pairs.val)

    @torch.no_grad()
    def reference_pass(self, pairs) -> None:
        """Log-probs of every pair under the starting weights with any LoRA adapters off (the
        base), into ``pair.ref`` (all ranks, same order and batch sizes: sharded backends
        gather parameters inside each forward)."""
        t = self.trainer
        model, micro, pad = self.backend.model, int(self.cfg.train.micro_batch_size), max(t.tokenizer.pad_id, 0)
        for lo in range(0, len(pairs), micro):
            chunk = pairs[lo:lo + micro]
            x, y, _ = t.model_inputs(collate_pairs(chunk, pad))
            with t.autocast():
                logps = reference_logprobs(model, {"input": x, "target": y}).double().cpu().tolist()
            for i, p in enumerate(chunk):
                p.ref = (logps[i], logps[len(chunk) + i])

    def init_identity(self) -> tuple[str, str]:
        """(digest, path) of the starting checkpoint as it is now (``adapters.identify``:
        a kiln checkpoint's manifest digest, an ``hf:`` directory's weight files' names, sizes
        and times)."""
        from train.sft.adapters import identify

        if getattr(self, "_init_identity", None) is None:
            self._init_identity = identify(self.init_dir or str(self.cfg.init_from))
        return self._init_identity

    def reference_fingerprint(self, pairs) -> str:
        """What the reference log-probs depend on: the starting weights (their digest, so a
        checkpoint retrained at the same path has another fingerprint) and the encoded pairs."""
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
        rank must agree on whether the file is used (the pass is collective). The cache holds
        summed log-probs whatever ``dpo.ipo_logps``: averaging happens in ``forward``."""
        b, path = self.backend, self.cfg.dpo.reference_cache
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
        if b.agree(f"whether dpo.reference_cache={path} holds these pairs' log-probs", cached is not None):
            for p, ref in zip(pairs, cached):
                p.ref = (float(ref[0]), float(ref[1]))
            if b.is_main:
                log().info(f"reference log-probs read from {path} (starting checkpoint digest "
                           f"{self.init_identity()[0]})")
            return
        if stale and b.is_main:
            log().info(f"dpo.reference_cache={path} {stale}: not used; recomputing the reference log-probs "
                       "and rewriting it")
        self.reference_pass(pairs)
        if b.is_main:
            log().info(f"reference log-probs of {len(pairs)} pairs computed from the starting weights")
        if path and b.is_main:
            digest, init = self.init_identity()
            os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"fingerprint": key, "init_digest": digest, "init": init,
                           "ref": [list(p.ref) for p in pairs]}, f)
            os.replace(tmp, str(path))


class RewardTask(_PairsTask):
    """A Bradley-Terry reward model on the pairs (``task=reward``): the SFT checkpoint with a
    scalar head on the last real token; the checkpoint is a kiln checkpoint whose weights
    are the LM's plus ``value.weight``."""

    name = "reward"

    def new_model(self, mc: ModelConfig) -> torch.nn.Module:
        return RewardModel(mc, margin=float(self.cfg.dpo.margin))

    def collate(self, pairs) -> dict:
        return collate_reward(pairs, max(self.trainer.tokenizer.pad_id, 0))

    def pair_scores(self, out, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return out[:n], out[n:]  # the rewards themselves
