"""The on-policy loop: each step samples a rollout batch from the policy, scores it, turns
scores into advantages, then runs ``rl.epochs`` passes of ``rl.minibatches`` optimiser steps
over it. The algorithm is a task object: ``PPOTask`` (critic, GAE, per-token KL penalty in
the reward, clipped surrogate and clipped value loss) or ``GRPOTask`` (G samples per
prompt, group-normalised advantages, k3 KL to the reference in the loss, no critic).

The reference policy is the starting checkpoint: a frozen copy for full fine-tuning, or,
with ``lora.enabled``, the same model with its adapters switched off (no second copy).
The policy is the starting LM (dropout forced to 0: PPO's ratio must be 1 before the first
update); with a reward model the critic starts from the reward model (``rl.critic_init``).

Checkpoints (kiln's atomic, verified ones, through ``CheckpointManager``) are written
between steps, when no rollout is in flight: the policy's weights and optimizer (files any
kiln reader loads as an LM; with ``lora.enabled``, the adapter and its optimizer only, with
``adapter_config.json`` naming the base by path and digest, as fine-tuning writes them, so
launch/generate.py loads the base with the adapter on top -- tested), the critic's
(``critic.safetensors`` and its optimizer), the step, the prompt stream's position, every
rank's sampling generator state (each rank restores its own), every global RNG, and
the starting checkpoint's digest -- a resumed run rebuilds the reference from init_from and
refuses one whose digest changed. A stopped run therefore continues exactly.

Runs on ``backend=single``, ``ddp``, ``fsdp`` and ``deepspeed`` with ZeRO-3 (validated). Every rank takes the
same global ``rl.prompts_per_step`` prompts from the stream and samples its own contiguous
slice (rank r: rows r*B..(r+1)*B-1) with its own generator; every statistic that spans the
batch (advantage whitening, explained variance, the reported reward/KL/length) is computed
over all ranks' rows, and each rank's loss is weighted by its share of the minibatch's valid
tokens, so the gradient DDP/FSDP averages is the one-process gradient of the same rows
(tested: the first step of a 2-process run equals one process's on the same rollouts). Under
FSDP/ZeRO-3 the policy is sharded (gathered once per rollout batch) and so is the
full-fine-tuning reference (``Backend.frozen_copy``: gathered a layer at a time by its
forward, 1/world of its weights per rank); the critic is a DDP replica.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data_pipeline.tokenizer import Tokenizer
from model.llama import Transformer
from model.value_head import ValueModel
from train import checkpoint as ckpt
from train import run_lock
from train.backends import build_backend
from train.checkpoint.full_state import (
    FullState,
    adamw_export,
    adamw_import,
    load_weights,
    named_params,
    read_init_weights,
    read_state_files,
)
from train.checkpoint.manager import CheckpointManager
from train.checkpoint.rng import RNGStates
from train.checkpoint.state import FilePiece, Progress
from train.errors import ConfigError
from train.metrics import MetricsLogger
from train.optim import build_adamw, lr_at
from train.rl import losses as L
from train.rl.rewards import Scorer
from train.rl.rollout import Rollout, response_logprobs, sample
from train.run_dir import record_run_config

log = logging.getLogger("kiln.rl")
CRITIC_FILE = "critic.safetensors"
CRITIC_OPTIM_FILE = "critic_optimizer.safetensors"


# ---- prompts ----------------------------------------------------------------------------

def prompt_text(rec) -> Optional[str]:
    """The user prompt of a record: ``prompt`` (text), alpaca ``instruction`` (+ ``input``),
    or the first user turn of ``messages``; None when it has none."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    if isinstance(rec.get("instruction"), str):
        extra = rec.get("input") or ""
        return rec["instruction"] + (f"\n\n{extra}" if extra else "")
    for m in rec.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))
    return None


def load_prompts(cfg, tok) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(train, held-out) prompts of ``sft.paths``, encoded through the chat template, unique,
    split by a stable hash (``sft.val_fraction``); prompts that leave no room for
    ``rl.max_new_tokens`` inside ``data.seq_len`` are dropped."""
    from data_pipeline.stream import split_of
    from train.sft.chat import encode_prompt
    from train.sft.records import raw_records

    room = int(cfg.data.seq_len) - int(cfg.rl.max_new_tokens)
    seen, train, val = set(), [], []
    for path in cfg.sft.paths:
        for _, rec in raw_records(str(path), cfg.sft.source, cfg.sft.hf_split):
            text = prompt_text(rec)
            if not text or text in seen:
                continue
            seen.add(text)
            ids = encode_prompt(tok, text)
            if len(ids) > room:
                continue
            (val if split_of(text, float(cfg.sft.val_fraction)) == "val" else train).append((text, ids))
    if not train:
        raise ConfigError("sft.paths", f"no usable prompt in {list(cfg.sft.paths)} (each needs data.seq_len - "
                          f"rl.max_new_tokens = {room} tokens of room)")
    return train, val


class PromptStream:
    """Endless prompts, reshuffled every epoch (seeded); its position is checkpointed."""

    fields = ("prompts",)

    def __init__(self, prompts: list, seed: int):
        self.prompts, self.seed, self.epoch, self.index = prompts, seed, 0, 0

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            if self.index >= len(self.prompts):
                self.epoch, self.index = self.epoch + 1, 0
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))
            out.append(self.prompts[int(order[self.index])])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"prompts": {"epoch": self.epoch, "index": self.index}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["prompts"]["epoch"]), int(state["prompts"]["index"])


class SamplerState:
    """Every rank's sampling generator state and the reference's identity, as trainer_state.json
    fields: ``sampler`` holds one state per rank (gathered, like ``RNGStates``), and each rank
    restores its own. ``restored`` says whether it did: a checkpoint written by another number
    of ranks (or before states were kept per rank) restores rank 0's only."""

    fields = ("sampler", "reference_digest")

    def __init__(self, generator: torch.Generator, reference_digest: str, backend):
        self.g, self.digest, self.b = generator, reference_digest, backend
        self.restored = False

    def state_dict(self) -> dict:
        return {"sampler": self.b.all_gather_object(self.g.get_state().tolist()), "reference_digest": self.digest}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("reference_digest")
        if saved is not None and saved != self.digest:
            raise ConfigError("init_from", f"the reference (init_from) has digest {self.digest}, but this run "
                              f"started from one with digest {saved}: it was retrained or replaced since; "
                              "start afresh (resume=none) or restore it")
        states = state["sampler"]
        if states and not isinstance(states[0], list):
            states = [states]  # one state: rank 0's (checkpoints written before every rank's was kept)
        mine = states[self.b.rank] if len(states) == self.b.world_size else states[0] if self.b.rank == 0 else None
        self.restored = mine is not None
        if mine is not None:
            self.g.set_state(torch.tensor(mine, dtype=torch.uint8))


# ---- the algorithms -----------------------------------------------------------------------

class PPOTask:
    """PPO with a critic: the reward per token is -kl_coef * KL (``rl.kl_estimator``) with the
    score added on the last response token; GAE(gamma, lam) gives advantages (whitened over
    the batch's valid tokens) and returns for the clipped value loss."""

    name = "ppo"
    samples_per_prompt = 1

    def __init__(self, run: RLTrainer):
        cfg, mc = run.cfg, run.model_cfg
        r = cfg.rl
        self.run = run
        if r.critic_init == "reward":
            from train.rl.rewards import load_reward_model

            critic = load_reward_model(str(r.reward_model), "off", torch.device("cpu"))
            critic.requires_grad_(True)
            if not critic.cfg.tie_embeddings:
                critic.output.weight.requires_grad = False
            critic.train()
        else:
            critic = ValueModel(mc)
            load_weights(critic, run.init_state, str(cfg.init_from))
        self.critic = critic.to(run.device)
        self.critic_model = self.critic  # what runs forward: DDP-wrapped on several ranks
        if run.world > 1:
            from train.backends.ddp import wrap_ddp

            self.critic_model = wrap_ddp(self.critic, run.device)
        self.optimizer = build_adamw(self.critic, cfg.optim, run.device)
        self.peak_lr = float(r.critic_lr) if r.critic_lr is not None else float(cfg.optim.lr)

    def values(self, r: Rollout) -> torch.Tensor:
        P, N = r.prompt_len, r.response_mask.shape[1]
        with self.run.autocast():
            v = self.critic_model(r.tokens, position_ids=r.position_ids, key_mask=r.key_mask)
        return v[:, P - 1:P + N - 1] * r.response_mask

    @torch.no_grad()
    def prepare(self, r: Rollout, ref_logp: torch.Tensor, scores: torch.Tensor) -> dict:
        rl, m = self.run.cfg.rl, r.response_mask
        self.critic.eval()
        values = self.values(r)
        self.critic.train()
        kl = L.kl_estimate(r.logprobs, ref_logp, rl.kl_estimator) * m
        rewards = L.token_rewards(scores, kl, m, float(rl.kl_coef))
        adv, ret = L.gae(rewards, values, m, float(rl.gamma), float(rl.lam))
        if rl.whiten_advantages:  # over every rank's rows: the statistics of the global batch
            ga, gm = self.run.gather_rows(adv), self.run.gather_rows(m)
            mean, var = L.masked_mean(ga, gm), L.masked_var(ga, gm)
            adv = (adv - mean) * torch.rsqrt(var + 1e-8) * m.to(adv.dtype)
        return {"advantages": adv, "returns": ret, "values": values,
                "explained_var": L.explained_variance(self.run.gather_rows(values), self.run.gather_rows(ret),
                                                      self.run.gather_rows(m))}

    def step(self, sub: Rollout, rows: torch.Tensor, batch: dict, lr_scale: float) -> dict:
        run, rl, m = self.run, self.run.cfg.rl, sub.response_mask
        with run.autocast():
            logp, logits = response_logprobs(run.policy, sub, float(rl.temperature))
        loss, metrics = L.policy_loss(logp, sub.logprobs, batch["advantages"][rows], m, float(rl.clip))
        share = run.token_share(m)
        run.optimize_policy(loss * share)
        v = self.values(sub)
        vloss, vm = L.value_loss(v, batch["values"][rows], batch["returns"][rows], m, float(rl.value_clip))
        (vloss * share).backward()
        if run.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.critic.parameters() if p.grad is not None],
                                           float(run.cfg.optim.grad_clip))
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr * lr_scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ent = L.masked_mean(L.entropy(logits.detach().float() / float(rl.temperature)), m)
        return {"loss": loss.detach(), "value_loss": vloss.detach(), "entropy": ent, **metrics, **vm}

    # checkpoint files of the critic
    def save(self, directory: str) -> None:
        moments, step = adamw_export(self.critic, self.optimizer)
        FullState(model=self.critic.state_dict(), moments=moments, step=step).save(
            directory, CRITIC_FILE, CRITIC_OPTIM_FILE)

    def load(self, directory: str) -> None:
        st = read_state_files(directory, True, CRITIC_FILE, CRITIC_OPTIM_FILE)
        for alias, name in named_params(self.critic)[1].items():  # a tied tensor is stored once
            st.model.setdefault(alias, st.model.get(name))
            st.model.setdefault(name, st.model.get(alias))
        self.critic.load_state_dict(st.model)
        adamw_import(self.critic, self.optimizer, st.moments, st.step)


class GRPOTask:
    """GRPO (DeepSeekMath): ``rl.group_size`` samples per prompt, each scored; advantage =
    (score - group mean) / (group std + eps) on every token of the sample; the loss is the
    clipped surrogate plus ``rl.beta`` * k3 KL to the reference, averaged over valid tokens."""

    name = "grpo"

    def __init__(self, run: RLTrainer):
        self.run = run
        self.samples_per_prompt = int(run.cfg.rl.group_size)

    @torch.no_grad()
    def prepare(self, r: Rollout, ref_logp: torch.Tensor, scores: torch.Tensor) -> dict:
        kl = L.kl_estimate(r.logprobs, ref_logp, "k1") * r.response_mask
        return {"advantages": L.group_advantages(scores, self.samples_per_prompt), "ref_logp": ref_logp,
                "kl_k1": kl}

    def step(self, sub: Rollout, rows: torch.Tensor, batch: dict, lr_scale: float) -> dict:
        run, rl, m = self.run, self.run.cfg.rl, sub.response_mask
        with run.autocast():
            logp, logits = response_logprobs(run.policy, sub, float(rl.temperature))
        loss, metrics = L.grpo_loss(logp, sub.logprobs, batch["ref_logp"][rows], batch["advantages"][rows], m,
                                    float(rl.clip), float(rl.beta))
        run.optimize_policy(loss * run.token_share(m))
        ent = L.masked_mean(L.entropy(logits.detach().float() / float(rl.temperature)), m)
        metrics.pop("kl", None)
        return {"loss": loss.detach(), "entropy": ent, **metrics}

    def save(self, directory: str) -> None:
        pass

    def load(self, directory: str) -> None:
        pass


TASKS = {"ppo": PPOTask, "grpo": GRPOTask}


# ---- the trainer --------------------------------------------------------------------------

class RLTrainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.backend = b = build_backend(cfg)
        self.device = b.device
        random.seed(int(cfg.train.seed))
        np.random.seed(int(cfg.train.seed) % 2**32)
        self.run_dir = str(cfg.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.run_lock, lock_error = None, None  # rank 0 holds the run directory's lock for every rank
        if b.is_main:
            try:
                self.run_lock = run_lock.acquire(self.run_dir)
            except run_lock.RunLockError as e:
                lock_error = e
        if b.world_size > 1:  # every rank fails alike (an exception's detail pickles; the exception may not)
            detail = b.broadcast_object(None if lock_error is None else lock_error.detail)
            if detail is not None:
                raise lock_error or run_lock.RunLockError(detail)
        elif lock_error is not None:
            raise lock_error
        try:
            self.init_dir = ckpt.resolve(str(cfg.init_from), str(cfg.checkpoint.verify))
        except FileNotFoundError as e:
            raise ConfigError("init_from", f"{e}. Make the default one with `python launch/sft.py`") from None
        self.reference_digest = ckpt.digest(self.init_dir)
        tok_path = str(cfg.tokenizer.path) if cfg.tokenizer.path else os.path.join(self.init_dir, ckpt.TOKENIZER)
        self.tokenizer = Tokenizer(tok_path)
        from train.sft.chat import END_OF_TURN, control_ids

        self.stop_ids = [self.tokenizer.eos_id, control_ids(self.tokenizer)[END_OF_TURN]]
        self.pad_id = max(self.tokenizer.pad_id, 0)
        mc = ckpt.read_model_config(self.init_dir)
        mc.dropout = 0.0
        for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "tie_embeddings"):
            cfg.model[k] = getattr(mc, k)
        self.model_cfg = mc
        if int(cfg.data.seq_len) > mc.max_seq_len:
            raise ConfigError("data.seq_len", f"{cfg.data.seq_len} exceeds the checkpoint's max_seq_len={mc.max_seq_len}")
        self.train_prompts, self.val_prompts = load_prompts(cfg, self.tokenizer)
        self.use_bf16 = b.bf16
        self.scorer = Scorer(cfg, self.tokenizer, self.device, self.autocast)  # a bad reward fails before the models

        torch.manual_seed(int(cfg.train.seed))
        self.init_state = read_init_weights(self.init_dir, mc, "off")
        policy = Transformer(mc)
        load_weights(policy, self.init_state, str(cfg.init_from))
        self.lora = bool(cfg.lora.enabled)
        if self.lora:
            from model.lora import add_lora, train_only

            lo = cfg.lora
            add_lora(policy, lo.name, lo.rank, lo.alpha, lo.dropout, list(lo.targets))
            train_only(policy, lo.name)
            reference = None  # the policy with its adapters off
        else:
            reference = copy.deepcopy(policy)  # before the backend wraps or shards the policy
        self.world, self.rank = b.data_parallel_size, b.data_parallel_rank
        rows = int(cfg.rl.prompts_per_step)
        if rows % self.world:
            raise ConfigError("rl.prompts_per_step", f"{rows} prompts do not split over {self.world} data-parallel "
                              "ranks (each rank samples an equal slice)")
        local = rows // self.world * (int(cfg.rl.group_size) if str(cfg.rl.algo) == "grpo" else 1)
        if local % int(cfg.rl.minibatches):
            raise ConfigError("rl.minibatches", f"{cfg.rl.minibatches} does not divide the {local} rollouts each "
                              f"of the {self.world} ranks holds")
        b.setup(policy)
        self.reference = None if reference is None else b.frozen_copy(reference)  # sharded like the policy
        self.policy = b.model
        # sampling runs the bare module: no DDP hooks around a forward that never backpropagates
        # (DDP's or DeepSpeed's module; FSDP's root itself, gathered once per batch)
        self.sampling_model = getattr(b, "raw_model", self.policy)
        self.task = TASKS[str(cfg.rl.algo)](self)
        self.init_state = None  # the critic has been built from it
        self.generator = torch.Generator(device=self.device).manual_seed(self._sampler_seed(0))
        self.prompts = PromptStream(self.train_prompts, int(cfg.sft.seed))
        self.state = Progress()
        self.ckpt_root = cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.sampler_state = SamplerState(self.generator, self.reference_digest, b)
        self.checkpoints = CheckpointManager(b, self.ckpt_root, str(cfg.checkpoint.verify),
                                             int(cfg.checkpoint.keep_last), False)
        self.checkpoints.track(FilePiece(self._save_weights, self._load_weights),
                               {"progress": self.state, "prompts": self.prompts, "sampler": self.sampler_state,
                                "rng": RNGStates(b)},
                               self._write_run_files)

    # -- pieces ---------------------------------------------------------------------------
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

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimize_policy(self, loss: torch.Tensor) -> None:
        self.backend.backward(loss)
        self.backend.step(self._lr, float(self.cfg.optim.grad_clip))

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
        ids = [p[1] for p in prompts for _ in range(self.task.samples_per_prompt)]
        t0 = time.perf_counter()
        r = sample(self.sampling_model, ids, int(self.cfg.rl.max_new_tokens), float(self.cfg.rl.temperature),
                   float(self.cfg.rl.top_p), self.stop_ids, self.pad_id, generator, self.device, self.autocast,
                   self.backend.zero3_offload(self.sampling_model))
        dt = time.perf_counter() - t0
        return r, float(r.response_mask.sum()) / max(dt, 1e-9)

    def _save_weights(self, directory: str, background: bool = False):
        if self.lora:  # the adapter (and its AdamW moments) only, as the fine-tuning task writes it
            from train.checkpoint.writing import Writing

            st = self.backend.export_full(trainable_only=True)  # every rank: gathering is collective
            if self.backend.is_main:
                if not st.model:
                    raise RuntimeError("adapter checkpoint: the backend returned no trained parameter")
                st.save(directory, ckpt.ADAPTER_FILE, ckpt.ADAPTER_OPTIM_FILE)
                self.task.save(directory)
            return Writing()
        writing = self.backend.save(directory, False)
        if self.backend.is_main:
            self.task.save(directory)
        return writing

    def _load_weights(self, directory: str, meta: dict) -> None:
        if self.lora:
            from train.checkpoint.full_state import read_adapter_state

            self.backend.import_full(read_adapter_state(directory) if self.backend.is_main else None, partial=True)
        else:
            self.backend.load(directory, meta)
        self.task.load(directory)

    def _write_run_files(self, directory: str) -> None:
        from train.sft.chat import JINJA_TEMPLATE, TEMPLATE_FILE

        OmegaConf.save(self.cfg, os.path.join(directory, ckpt.CONFIG), resolve=True)
        OmegaConf.save(OmegaConf.structured(self.model_cfg), os.path.join(directory, ckpt.MODEL_CONFIG))
        shutil.copyfile(self.tokenizer.path, os.path.join(directory, ckpt.TOKENIZER))
        with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(JINJA_TEMPLATE)
        if self.lora:  # what train.sft.adapters (launch/generate.py, merge_lora.py) reads: base by path and digest
            lo = self.cfg.lora
            info = {"name": lo.name, "rank": lo.rank, "alpha": lo.alpha, "dropout": lo.dropout,
                    "targets": list(lo.targets), "base": self.init_dir, "base_digest": self.reference_digest,
                    "task": self.task.name, "labels": None, "quantize": None}
            with open(os.path.join(directory, ckpt.ADAPTER_CONFIG), "w") as f:
                json.dump(info, f, indent=1)

    def save(self) -> Optional[str]:
        b = self.backend
        meta = {"backend": b.name, "zero_stage": int(self.cfg.backend.zero_stage), "world_size": b.world_size,
                "data_parallel_size": b.data_parallel_size, "tokens": self.state.tokens,
                "model": OmegaConf.to_container(OmegaConf.structured(self.model_cfg)),
                "provenance": {"weights_from": "kiln checkpoint", "path": self.init_dir,
                               "digest": self.reference_digest, "algo": self.task.name}}
        self.checkpoints.start(self.state.step, meta)
        committed = self.checkpoints.wait()
        return committed[0] if committed else None

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Fresh samples (at rl.temperature, one fixed seed: the same draws before and after)
        for the first ``rl.eval_prompts`` held-out prompts, scored by the reward."""
        prompts = self.val_prompts[: int(self.cfg.rl.eval_prompts)]
        if not prompts:
            return None
        g = torch.Generator(device=self.device).manual_seed(int(self.cfg.rl.seed) + 1)
        r = sample(self.sampling_model, [p[1] for p in prompts], int(self.cfg.rl.max_new_tokens),
                   float(self.cfg.rl.temperature), float(self.cfg.rl.top_p), self.stop_ids, self.pad_id, g,
                   self.device, self.autocast, self.backend.zero3_offload(self.sampling_model))
        scores = self.scorer(r, [p[0] for p in prompts])
        ref = self.reference_logprobs(r)
        kl = (L.kl_estimate(r.logprobs, ref, "k1") * r.response_mask).sum(1)
        replies = [self.tokenizer.decode([t for t in row if t not in self.stop_ids]) for row in r.response_ids()]
        return {"eval_reward_mean": float(scores.mean()), "eval_kl": float(kl.mean()),
                "eval_response_len": float(r.response_lengths().float().mean()),
                "samples": [{"prompt": p[0], "reply": t, "reward": float(s)}
                            for p, t, s in zip(prompts, replies, scores.tolist())]}

    # -- the loop -----------------------------------------------------------------------------
    def resume(self) -> Optional[str]:
        path = self.checkpoints.resume_point(str(self.cfg.resume))
        if path is None:
            return None
        theirs = ckpt.read_model_config(path).shape()
        if theirs != self.model_cfg.shape():
            raise ConfigError("init_from", f"{path} holds another model than init_from={self.cfg.init_from}")
        self.checkpoints.load(path)
        if not self.sampler_state.restored:  # written by another number of ranks: a fresh stream for this rank
            self.generator.manual_seed(self._sampler_seed(self.state.step))
        return path

    def fit(self) -> dict:
        cfg, b, _rl = self.cfg, self.backend, self.cfg.rl
        resumed = self.resume()
        if b.is_main:
            record_run_config(cfg, self.run_dir)
            if resumed is None and os.path.exists(os.path.join(self.run_dir, "eval_samples.jsonl")):
                os.remove(os.path.join(self.run_dir, "eval_samples.jsonl"))  # a fresh start's before/after
        logger = MetricsLogger(cfg, self.run_dir, b.is_main, int(cfg.train.max_steps), self.state.step)
        logger.log(self.state.step, {"algo": self.task.name, "init_from": self.init_dir, "resumed_from": resumed,
                                     "train_prompts": len(self.train_prompts), "val_prompts": len(self.val_prompts)},
                   kind="run")
        result = {"resumed_from": resumed, "start_step": self.state.step, "steps": {}, "evals": {}}
        eval_every = int(cfg.train.eval_every)
        if resumed is None and eval_every > 0:
            self._eval(0, logger, result)
        stop_at = cfg.train.stop_at_step
        while self.state.step < int(cfg.train.max_steps):
            metrics = self.train_step()
            self.state.step += 1
            step = self.state.step
            result["steps"][step] = metrics
            logger.log(step, metrics)
            last = step == int(cfg.train.max_steps)
            if eval_every > 0 and (step % eval_every == 0 or last):
                self._eval(step, logger, result)
            stop = stop_at is not None and step >= int(stop_at)
            if step % int(cfg.checkpoint.every) == 0 or last or stop:
                self.save()
            if stop:
                result["stopped"] = True
                break
        logger.close()
        result["final_step"] = self.state.step
        if b.is_main and cfg.logger.plot:
            from train.rl.report import plot_rl

            result["plot"] = plot_rl(os.path.join(self.run_dir, "metrics.jsonl"),
                                     os.path.join(self.run_dir, "rl_curves.png"), f"kiln {self.task.name}: {cfg.run_name}")
        if b.is_main and result["evals"]:
            from train.rl.report import write_generations

            write_generations(os.path.join(self.run_dir, "generations.md"), self.run_dir, self.task.name)
        return result

    def _eval(self, step: int, logger: MetricsLogger, result: dict) -> None:
        ev = self.evaluate()
        if ev is None:
            return
        samples = ev.pop("samples")
        logger.log(step, ev, kind="eval")
        result["evals"][step] = ev
        if self.backend.is_main:
            with open(os.path.join(self.run_dir, "eval_samples.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **ev, "samples": samples}) + "\n")

    def collect(self) -> tuple[Rollout, torch.Tensor, float]:
        """The rollout phase: this rank's slice of the step's prompts, sampled and scored."""
        per = int(self.cfg.rl.prompts_per_step) // self.world
        prompts = self.prompts.take(int(self.cfg.rl.prompts_per_step))[self.rank * per:(self.rank + 1) * per]
        r, gen_tps = self.rollout(prompts, self.generator)
        texts = [p[0] for p in prompts for _ in range(self.task.samples_per_prompt)]
        return r, self.scorer(r, texts), gen_tps

    def train_step(self) -> dict:
        return self.optimise(*self.collect())

    def optimise(self, r: Rollout, scores: torch.Tensor, gen_tps: float = 0.0) -> dict:
        """The optimisation phase over one rollout batch (this rank's rows)."""
        cfg, rl = self.cfg, self.cfg.rl
        step = self.state.step
        self._lr = lr_at(step, cfg.optim, int(cfg.train.max_steps))
        lr_scale = self._lr / float(cfg.optim.lr) if float(cfg.optim.lr) > 0 else 0.0
        ref_logp = self.reference_logprobs(r)
        batch = self.task.prepare(r, ref_logp, scores)
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
                out = self.task.step(r.select(rows), rows, batch, lr_scale)
                if self.world > 1:  # token means over every rank's rows of the minibatch
                    share = self.token_share(m[rows]) / self.world
                    keys = sorted(out)
                    vals = self.backend.all_reduce_sum([float(out[k]) * share for k in keys])
                    out = dict(zip(keys, vals))
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        self.state.tokens += int(sum(self.backend.all_reduce_sum([float(r.key_mask.sum())])))
        metrics = {k: v / n for k, v in sums.items()}
        scores, kl_seq, lengths = self.gather_rows(scores), self.gather_rows(kl_seq), self.gather_rows(m.sum(1))
        B = len(scores)
        metrics.update({"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if B > 1 else 0.0,
                        "kl": float(kl_seq.mean()), "response_len": float(lengths.float().mean()),
                        "gen_tokens_per_s": sum(self.backend.all_reduce_sum([gen_tps])), "lr": self._lr})
        if "explained_var" in batch:
            metrics["explained_var"] = batch["explained_var"]
        return metrics
