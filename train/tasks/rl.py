"""On-policy RLHF as a task of the one loop (``Trainer(cfg, RLTask(cfg))``): each optimizer
step of the loop is one rollout step -- sample a batch from the policy, score it, turn scores
into advantages, then ``rl.epochs`` passes of ``rl.minibatches`` backend steps over it
(``owns_step``). The algorithm is an object of train/rl/algorithms.py: ``PPO`` or ``GRPO``.

What the loop gives it like any job: the run directory and its lock, resume and verified
checkpoints, logging (each rollout step's reward, KL, length, entropy, clip fraction, value
loss, explained variance and generation speed are the "train" record's task values),
evaluation at ``train.eval_every`` (fresh samples for ``rl.eval_prompts`` held-out prompts,
one fixed seed), stop requests and signals, NaN rollback.

The policy is the starting LM (``init_from``, dropout forced to 0: PPO's ratio must be 1
before the first update), built as fine-tuning builds it, LoRA included. The reference is
the starting checkpoint: a frozen copy for full fine-tuning, held as the backend holds
weights (``Backend.frozen_copy``: sharded under FSDP and ZeRO-3), or with ``lora.enabled``
the same model with its adapters switched off (no second copy). With a reward model the
critic starts from it (``rl.critic_init``); it is a DDP replica on several ranks.

Checkpoints hold the policy's weights and optimizer as fine-tuning writes them (with
``lora.enabled``, the adapter only, with ``adapter_config.json`` naming the base by path and
digest), the critic's files, the step, the prompt stream's position, every rank's sampling
generator state (each rank restores its own), every RNG and the starting checkpoint's digest
-- a resumed run rebuilds the reference from init_from and refuses one whose digest changed.
A stopped run therefore continues exactly.

Every rank takes the same global ``rl.prompts_per_step`` prompts from the stream and samples
its own contiguous slice (rank r: rows r*B..(r+1)*B-1) with its own generator; every
statistic that spans the batch (advantage whitening, explained variance, the reported
reward/KL/length) is computed over all ranks' rows, and each rank's loss is weighted by its
share of the minibatch's valid tokens, so the gradient DDP/FSDP/ZeRO-3 averages is the
one-process gradient of the same rows.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from model.llama import ModelConfig
from train import checkpoint as ckpt
from train.checkpoint.full_state import read_init_weights
from train.errors import ConfigError
from train.rl import losses as L
from train.rl.algorithms import ALGORITHMS
from train.rl.prompts import PromptStream, SamplerState, load_prompts
from train.rl.report import EVAL_SAMPLES
from train.rl.rewards import Scorer
from train.rl.rollout import Rollout, response_logprobs, sample
from train.tasks.finetune import FinetuneTask


class RLTask(FinetuneTask):
    name = "rl"
    uses_chat_template = True
    owns_step = True

    def __init__(self, cfg):
        if not cfg.init_from or not os.path.isdir(str(cfg.init_from)):
            raise ConfigError("init_from", f"checkpoint directory not found: {cfg.init_from!r}. The policy starts "
                              "from a fine-tuned run: make the default one with `python launch/sft.py`")
        super().__init__(cfg)
        self.reference_digest = ckpt.digest(self.init_dir)
        self.algo = None  # PPO or GRPO, once the policy is set up
        self.reference = None
        self.last: dict = {}  # the last rollout step's metrics
        self.evals: dict = {}  # step -> the held-out metrics of that step's evaluation
        self.gen_tps: dict = {}  # step -> generation tokens/s

    # -- what is built --------------------------------------------------------------------------
    def build_model_config(self) -> ModelConfig:
        self.cfg.model.dropout = 0.0  # PPO's ratio must be 1 before the first update
        return super().build_model_config()

    def load_data(self) -> None:
        """Prompts, stop ids and the reward (model or function: a bad one fails before any
        model is built); the step's rows must split evenly over the data-parallel ranks."""
        cfg, b, tok = self.cfg, self.backend, self.trainer.tokenizer
        from train.sft.chat import END_OF_TURN, control_ids

        self.stop_ids = [tok.eos_id, control_ids(tok)[END_OF_TURN]]
        self.pad_id = max(tok.pad_id, 0)
        self.device, self.world, self.rank = b.device, b.data_parallel_size, b.data_parallel_rank
        rows = int(cfg.rl.prompts_per_step)
        if rows % self.world:
            raise ConfigError("rl.prompts_per_step", f"{rows} prompts do not split over {self.world} data-parallel "
                              "ranks (each rank samples an equal slice)")
        local = rows // self.world * (int(cfg.rl.group_size) if str(cfg.rl.algo) == "grpo" else 1)
        if local % int(cfg.rl.minibatches):
            raise ConfigError("rl.minibatches", f"{cfg.rl.minibatches} does not divide the {local} rollouts each "
                              f"of the {self.world} ranks holds")
        self.train_prompts, self.val_prompts = load_prompts(cfg, tok)
        self.scorer = Scorer(cfg, tok, self.device, self.trainer.autocast)

    def build_model(self) -> torch.nn.Module:
        """The policy as fine-tuning builds it; for full fine-tuning, its starting copy (the
        reference) is taken now, before the backend wraps or shards the policy."""
        policy = super().build_model()
        self._reference_copy = None if self.lora else copy.deepcopy(policy)
        return policy

    def load_initial_weights(self) -> None:
        """After the backend set the policy up: the reference held as the backend holds
        weights, the sampler, the prompt stream and the algorithm (PPO's critic)."""
        cfg, b = self.cfg, self.backend
        ref, self._reference_copy = self._reference_copy, None
        self.reference = None if ref is None else b.frozen_copy(ref)
        self.policy = b.model
        # sampling runs the bare module: no DDP hooks around a forward that never backpropagates
        self.sampling_model = b.raw_model
        self.generator = torch.Generator(device=self.device).manual_seed(self._sampler_seed(0))
        self.prompts = PromptStream(self.train_prompts, int(cfg.sft.seed))
        self.sampler_state = SamplerState(self.generator, self.reference_digest, b)
        self.model_cfg = self.trainer.model_cfg
        needs_init = str(cfg.rl.algo) == "ppo" and cfg.rl.critic_init != "reward"
        self.init_state = read_init_weights(self.init_dir, self.model_cfg, "off") if needs_init else None
        self.algo = ALGORITHMS[str(cfg.rl.algo)](self)
        self.init_state = None  # the critic has been built from it

    def build_data(self):
        return None, []  # prompts, not micro-batches: the stream is a checkpoint piece of its own

    def checkpoint_pieces(self) -> dict:
        return {"prompts": self.prompts, "sampler": self.sampler_state}

    def batch_summary(self) -> str:
        rl = self.cfg.rl
        per = int(rl.group_size) if str(rl.algo) == "grpo" else 1
        return (f"one step = {rl.prompts_per_step} prompts x {per} samples over {self.world} data-parallel ranks, "
                f"then {rl.epochs} epochs x {rl.minibatches} minibatch steps; evaluation: {rl.eval_prompts} "
                f"held-out prompts of {len(self.val_prompts)}")

    # -- pieces the algorithms use -------------------------------------------------------------
    @property
    def autocast(self):
        return self.trainer.autocast

    def _sampler_seed(self, step: int) -> int:
        """Rank 0 (and one process) seeds its sampler with rl.seed; rank k > 0 with its own seed."""
        if self.rank == 0:
            return int(self.cfg.rl.seed)
        return int(self.cfg.rl.seed) + 1_000_003 * self.rank + 7_919 * step

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t`` concatenated in rank order (the global batch's row order);
        ``t`` itself on one process."""
        if self.world == 1:
            return t
        x = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo gathers no bools
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts).to(t.dtype)

    def token_share(self, mask: torch.Tensor) -> float:
        """world x this rank's share of the minibatch's valid tokens: a rank's token-mean loss
        times this, averaged by DDP over ranks, is the token mean over every rank's rows."""
        if self.world == 1:
            return 1.0
        n = float(mask.sum())
        total = sum(self.backend.all_reduce_sum([n]))
        return n * self.world / max(total, 1.0)

    def optimize_policy(self, loss: torch.Tensor) -> None:
        self.backend.backward(loss)
        self.grad_norm = self.backend.step(self._lr, float(self.cfg.optim.grad_clip))

    def reference_logprobs(self, r: Rollout) -> torch.Tensor:
        temp = float(self.cfg.rl.temperature)
        with torch.no_grad(), self.autocast():
            if self.reference is not None:
                return response_logprobs(self.reference, r, temp)[0]
            from model.lora import set_active_adapter

            set_active_adapter(self.policy, None)
            try:
                return response_logprobs(self.policy, r, temp)[0]
            finally:
                set_active_adapter(self.policy, str(self.cfg.lora.name))

    def rollout(self, prompts: list, generator: torch.Generator) -> tuple[Rollout, float]:
        """Samples for ``prompts`` (each repeated ``samples_per_prompt`` times, adjacent) and the
        generation throughput (valid response tokens per second)."""
        rl = self.cfg.rl
        ids = [p[1] for p in prompts for _ in range(self.algo.samples_per_prompt)]
        t0 = time.perf_counter()
        r = sample(self.sampling_model, ids, int(rl.max_new_tokens), float(rl.temperature), float(rl.top_p),
                   self.stop_ids, self.pad_id, generator, self.device, self.autocast,
                   self.backend.zero3_offload(self.sampling_model))
        return r, float(r.response_mask.sum()) / max(time.perf_counter() - t0, 1e-9)

    # -- one step of the loop ------------------------------------------------------------------
    def next_batches(self, n: int) -> list:
        """A rollout step's prompts, taken and dropped (the loop skips a poisoned step's data
        this way after a NaN rollback)."""
        self.prompts.take(int(self.cfg.rl.prompts_per_step))
        return []

    def collect(self) -> tuple[Rollout, torch.Tensor, float]:
        """The rollout phase: this rank's slice of the step's prompts, sampled and scored."""
        per = int(self.cfg.rl.prompts_per_step) // self.world
        prompts = self.prompts.take(int(self.cfg.rl.prompts_per_step))[self.rank * per:(self.rank + 1) * per]
        if not self.sampler_state.restored and self.sampler_state.loaded:
            # written by another number of ranks: a fresh stream for this rank from here
            self.generator.manual_seed(self._sampler_seed(self.trainer.state.step))
            self.sampler_state.loaded = False
        r, gen_tps = self.rollout(prompts, self.generator)
        texts = [p[0] for p in prompts for _ in range(self.algo.samples_per_prompt)]
        return r, self.scorer(r, texts), gen_tps

    def train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One rollout step (``owns_step``): (mean policy loss, the last backend step's gradient
        norm, tokens trained on over every rank)."""
        self.last = self.optimise(*self.collect(), lr=lr)
        self.gen_tps[self.trainer.state.step + 1] = self.last["gen_tokens_per_s"]
        return torch.tensor(self.last.pop("loss")), self.grad_norm, self.last.pop("tokens")

    def optimise(self, r: Rollout, scores: torch.Tensor, gen_tps: float = 0.0, lr: Optional[float] = None) -> dict:
        """The optimisation phase over one rollout batch (this rank's rows)."""
        cfg, rl = self.cfg, self.cfg.rl
        if lr is None:
            from train.optim import lr_at

            lr = lr_at(self.trainer.state.step, cfg.optim, int(cfg.train.max_steps))
        self._lr = lr
        lr_scale = lr / float(cfg.optim.lr) if float(cfg.optim.lr) > 0 else 0.0
        ref_logp = self.reference_logprobs(r)
        batch = self.algo.prepare(r, ref_logp, scores)
        m = r.response_mask
        kl_seq = (L.kl_estimate(r.logprobs, ref_logp, "k1") * m).sum(1)
        B = len(scores)
        size = B // int(rl.minibatches)
        sums: dict[str, float] = {}
        n = 0
        for _ in range(int(rl.epochs)):
            order = torch.randperm(B)
            for lo in range(0, B, size):
                rows = order[lo:lo + size].to(self.device)
                out = self.algo.step(r.select(rows), rows, batch, lr_scale)
                if self.world > 1:  # token means over every rank's rows of the minibatch
                    share = self.token_share(m[rows]) / self.world
                    keys = sorted(out)
                    vals = self.backend.all_reduce_sum([float(out[k]) * share for k in keys])
                    out = dict(zip(keys, vals))
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        tokens = int(sum(self.backend.all_reduce_sum([float(r.key_mask.sum())])))
        metrics = {k: v / n for k, v in sums.items()}
        scores, kl_seq, lengths = self.gather_rows(scores), self.gather_rows(kl_seq), self.gather_rows(m.sum(1))
        B = len(scores)
        metrics.update({"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if B > 1 else 0.0,
                        "kl": float(kl_seq.mean()), "response_len": float(lengths.float().mean()),
                        "gen_tokens_per_s": sum(self.backend.all_reduce_sum([gen_tps])), "tokens": tokens})
        if "explained_var" in batch:
            metrics["explained_var"] = batch["explained_var"]
        return metrics

    def train_metrics(self) -> dict:
        return dict(self.last)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Fresh samples (at rl.temperature, one fixed seed: the same draws before and after)
        for the first ``rl.eval_prompts`` held-out prompts, scored by the reward; their reward,
        KL and length are the eval record (``eval_metrics``), there is no validation loss."""
        self.eval_result = self.sample_held_out()
        if self.eval_result is not None:
            step = self.trainer.state.step
            samples = self.eval_result.pop("samples")
            self.evals[step] = dict(self.eval_result)
            if self.backend.is_main:  # step 0 only on a fresh start: it starts the file afresh
                mode = "w" if step == 0 else "a"
                with open(os.path.join(self.trainer.run_dir, EVAL_SAMPLES), mode, encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **self.eval_result, "samples": samples}) + "\n")
        return None

    def sample_held_out(self) -> Optional[dict]:
        rl = self.cfg.rl
        prompts = self.val_prompts[: int(rl.eval_prompts)]
        if not prompts:
            return None
        g = torch.Generator(device=self.device).manual_seed(int(rl.seed) + 1)
        r = sample(self.sampling_model, [p[1] for p in prompts], int(rl.max_new_tokens), float(rl.temperature),
                   float(rl.top_p), self.stop_ids, self.pad_id, g, self.device, self.autocast,
                   self.backend.zero3_offload(self.sampling_model))
        scores = self.scorer(r, [p[0] for p in prompts])
        ref = self.reference_logprobs(r)
        kl = (L.kl_estimate(r.logprobs, ref, "k1") * r.response_mask).sum(1)
        tok = self.trainer.tokenizer
        replies = [tok.decode([t for t in row if t not in self.stop_ids]) for row in r.response_ids()]
        return {"eval_reward_mean": float(scores.mean()), "eval_kl": float(kl.mean()),
                "eval_response_len": float(r.response_lengths().float().mean()),
                "samples": [{"prompt": p[0], "reply": t, "reward": float(s)}
                            for p, t, s in zip(prompts, replies, scores.tolist())]}

    def eval_metrics(self) -> dict:
        return dict(self.eval_result or {})

    # -- checkpoints -----------------------------------------------------------------------------
    def save_model_state(self, directory: str, background: bool = False):
        """The policy as fine-tuning writes it (the adapter only with LoRA), then the
        algorithm's own files (PPO's critic) from rank 0."""
        writing = super().save_model_state(directory, background)
        if self.backend.is_main:
            self.algo.save(directory)
        return writing

    def load_model_state(self, directory: str, meta: dict) -> None:
        super().load_model_state(directory, meta)
        self.algo.load(directory)

    def write_extra_files(self, directory: str) -> None:
        from train.sft.chat import JINJA_TEMPLATE, TEMPLATE_FILE

        super().write_extra_files(directory)
        with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(JINJA_TEMPLATE)

    # -- around the loop -------------------------------------------------------------------------
    def before_fit(self) -> None:
        """Nothing before the resume point is known: a fresh run's samples file is started
        by its step-0 evaluation (the loop evaluates step 0 only when it did not resume)."""

    def after_fit(self, result: dict) -> None:
        result["evals"] = dict(self.evals)
        result["gen_tokens_per_s"] = dict(self.gen_tps)
        if self.backend.is_main and self.evals:
            from train.rl.report import write_generations

            path = write_generations(os.path.join(self.trainer.run_dir, "generations.md"), self.trainer.run_dir,
                                     str(self.cfg.rl.algo))
            if path:  # written when there were two evaluations to put side by side
                result["generations_path"] = path

    def plot(self) -> Optional[str]:
        from train.rl.report import plot_rl

        run_dir = self.trainer.run_dir
        return plot_rl(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "rl_curves.png"),
                       f"kiln {self.cfg.rl.algo}: {self.cfg.run_name}")
