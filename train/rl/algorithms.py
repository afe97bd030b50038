"""The two on-policy algorithms the RL task (train/tasks/rl.py) runs: ``PPO`` (critic, GAE,
per-token KL penalty in the reward, clipped surrogate and clipped value loss) and ``GRPO``
(G samples per prompt, group-normalised advantages, k3 KL to the reference in the loss, no
critic). Each turns a scored rollout into what its minibatch steps need (``prepare``), takes
one minibatch step (``step``: the policy through the task's backend, PPO's critic with its own
AdamW) and saves and loads what it trains beside the policy (PPO's critic files)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model.value_head import ValueModel
from train.checkpoint.full_state import (
    FullState,
    adamw_export,
    adamw_import,
    load_weights,
    named_params,
    read_state_files,
)
from train.optim import build_adamw
from train.rl import losses as L
from train.rl.rollout import Rollout, response_logprobs

if TYPE_CHECKING:
    from train.tasks.rl import RLTask

CRITIC_FILE = "critic.safetensors"
CRITIC_OPTIM_FILE = "critic_optimizer.safetensors"


class PPO:
    """PPO with a critic: the reward per token is -kl_coef * KL (``rl.kl_estimator``) with the
    score added on the last response token; GAE(gamma, lam) gives advantages (whitened over
    the batch's valid tokens) and returns for the clipped value loss."""

    name = "ppo"
    samples_per_prompt = 1

    def __init__(self, run: RLTask):
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


class GRPO:
    """GRPO (DeepSeekMath): ``rl.group_size`` samples per prompt, each scored; advantage =
    (score - group mean) / (group std + eps) on every token of the sample; the loss is the
    clipped surrogate plus ``rl.beta`` * k3 KL to the reference, averaged over valid tokens."""

    name = "grpo"

    def __init__(self, run: RLTask):
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


ALGORITHMS = {"ppo": PPO, "grpo": GRPO}
