"""The RLHF config: ``SFTConfig`` (init_from, sft.paths for the prompts, lora, optim, train,
checkpoint, backend) plus the ``rl`` block, registered as ``rl_schema`` for conf/ppo.yaml and
conf/grpo.yaml. One step (``train.max_steps`` counts them) is one rollout batch and the
optimisation epochs over it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from train.config import _check
from train.errors import ConfigError
from train.rl.losses import KL_ESTIMATORS
from train.sft.config import SFTConfig, validate_sft

ALGOS = ("ppo", "grpo")


@dataclass
class RLConfig:
    algo: str = "ppo"  # ppo (critic, GAE) | grpo (G samples per prompt, group-normalised advantages, no critic)
    # The reward: a kiln reward-model checkpoint (launch/reward.py's run dir, checkpoints root or
    # step dir), or a Python function "module:function" (verifiable rewards) called as
    # fn(prompts=list[str], responses=list[str], response_ids=list[list[int]]) -> list[float].
    # Exactly one of the two is set.
    reward_model: Optional[str] = None
    reward_fn: Optional[str] = None
    critic_init: str = "reward"  # ppo: the critic starts from the reward model (reward) or the policy (policy)
    prompts_per_step: int = 8  # prompts sampled per rollout batch
    group_size: int = 4  # grpo: samples per prompt (ppo samples each prompt once)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    epochs: int = 2  # optimisation passes over each rollout batch
    minibatches: int = 2  # per epoch; the rollout batch must split evenly
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # critic: values move at most this far from the rollout's per step
    kl_coef: float = 0.05  # ppo: per-token penalty -kl_coef * KL in the reward
    kl_estimator: str = "k1"  # ppo's penalty: k1 | k2 | k3 (train/rl/losses.py)
    beta: float = 0.04  # grpo: weight of the k3 KL to the reference in the loss
    whiten_advantages: bool = True  # ppo: advantages whitened over the batch's valid tokens
    critic_lr: Optional[float] = None  # ppo: the critic's peak lr (null: optim.lr)
    # held-out prompts sampled at rl.temperature with one fixed seed (the same draws before and
    # after training) and scored by the reward (0: none)
    eval_prompts: int = 16
    seed: int = 0  # the sampling generator's seed (its state is checkpointed)


@dataclass
class RLRunConfig(SFTConfig):
    rl: RLConfig = field(default_factory=RLConfig)


def register_rl_configs() -> None:
    from train.sft.config import register_sft_configs

    register_sft_configs()
    ConfigStore.instance().store(name="rl_schema", node=RLRunConfig)


def validate_rl(cfg: Any) -> None:
    """The ``rl`` block's relations, and the fine-tuning keys through ``validate_sft``. Raises
    ConfigError naming the key, before any model is built."""
    r = cfg.rl
    _check(r.algo in ALGOS, "rl.algo", f"unknown algorithm {r.algo!r} ({' | '.join(ALGOS)})")
    if bool(r.reward_model) == bool(r.reward_fn):
        raise ConfigError("rl.reward_model", "set exactly one of rl.reward_model (a launch/reward.py checkpoint) "
                          f"and rl.reward_fn (module:function); got {r.reward_model!r} and {r.reward_fn!r}")
    if r.reward_fn:
        _check(":" in str(r.reward_fn), "rl.reward_fn", f"must be module:function, got {r.reward_fn!r}")
    _check(r.critic_init in ("reward", "policy"), "rl.critic_init", f"reward | policy, got {r.critic_init!r}")
    _check(r.algo != "ppo" or r.critic_init == "policy" or bool(r.reward_model), "rl.critic_init",
           "critic_init=reward needs rl.reward_model (with rl.reward_fn the critic starts from the policy)")
    _check(r.kl_estimator in KL_ESTIMATORS, "rl.kl_estimator", f"unknown {r.kl_estimator!r} ({' | '.join(KL_ESTIMATORS)})")
    for key in ("prompts_per_step", "max_new_tokens", "epochs", "minibatches"):
        _check(int(r[key]) > 0, f"rl.{key}", f"must be positive, got {r[key]}")
    _check(r.group_size >= (2 if r.algo == "grpo" else 1), "rl.group_size",
           f"grpo needs at least 2 samples per prompt, got {r.group_size}")
    rows = r.prompts_per_step * (r.group_size if r.algo == "grpo" else 1)
    _check(rows % r.minibatches == 0, "rl.minibatches",
           f"{r.minibatches} does not divide the {rows} rollouts of a step")
    _check(r.temperature > 0, "rl.temperature", f"must be positive (sampling), got {r.temperature}")
    _check(0.0 < r.top_p <= 1.0, "rl.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(0.0 <= r.gamma <= 1.0, "rl.gamma", f"must be in [0, 1], got {r.gamma}")
    _check(0.0 <= r.lam <= 1.0, "rl.lam", f"must be in [0, 1], got {r.lam}")
    _check(r.clip > 0, "rl.clip", f"must be positive, got {r.clip}")
    _check(r.value_clip > 0, "rl.value_clip", f"must be positive, got {r.value_clip}")
    _check(r.kl_coef >= 0, "rl.kl_coef", f"must be >= 0, got {r.kl_coef}")
    _check(r.beta >= 0, "rl.beta", f"must be >= 0, got {r.beta}")
    _check(r.max_new_tokens < cfg.data.seq_len, "rl.max_new_tokens",
           f"{r.max_new_tokens} leaves no room for a prompt in data.seq_len={cfg.data.seq_len} (prompt + reply "
           "must fit): lower it or raise data.seq_len")
    # The fine-tuning keys RL reads (init_from, sft.paths, lora.*) are validated by their owner;
    # the two fine-tuning modes the RL task does not implement are refused first, by name.
    _check(not cfg.prompt_tuning.enabled, "prompt_tuning.enabled",
           "the RL task does not implement prompt tuning (it would train the LoRA adapters or the whole policy "
           "and ignore the setting): use lora.enabled=true or full fine-tuning")
    _check(cfg.lora.quantize is None, "lora.quantize",
           f"the RL task does not implement QLoRA ({cfg.lora.quantize!r}: its policy and reference would keep "
           "full-precision base weights, not the 4-bit ones asked for): set lora.quantize=null")
    _check(int(cfg.train.grad_accum_steps) == 1, "train.grad_accum_steps",
           f"{cfg.train.grad_accum_steps}: an RL step's unit is a minibatch of its rollouts (rl.minibatches), "
           "each one optimizer step; accumulating them would make DeepSpeed update every N-th minibatch only")
    _check(float(cfg.lora.dropout) == 0.0, "lora.dropout",
           f"{cfg.lora.dropout}: the policy samples and is trained in train mode, and PPO's ratio must be 1 "
           "before the first update (the model's dropout is forced to 0 for the same reason); set lora.dropout=0")
    _check(not cfg.train.compile, "train.compile",
           "the RL task samples through the policy's blocks with a KV cache that grows every decoding step: "
           "compiled blocks would recompile for each new length; set train.compile=false")
    init = str(cfg.init_from or "")
    _check(bool(init) and os.path.isdir(init), "init_from",
           f"checkpoint directory not found: {init!r}. The policy starts from a fine-tuned run: make the default one "
           "with `python launch/sft.py` (writes runs/sft), or pass init_from=<your run dir>")
    validate_sft(cfg)
    _check(cfg.backend.name in ("single", "ddp", "fsdp", "deepspeed"), "backend.name",
           f"RLHF runs on backend=single, ddp, fsdp or deepspeed (ZeRO-3), got {cfg.backend.name}")
    _check(cfg.backend.name != "deepspeed" or int(cfg.backend.zero_stage) == 3, "backend.zero_stage",
           f"RLHF under DeepSpeed runs (and is tested) with ZeRO-3 only, got zero_stage={cfg.backend.zero_stage}")
