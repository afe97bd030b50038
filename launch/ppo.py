"""RLHF with PPO (train/tasks/rl.py). `python launch/ppo.py` optimises runs/sft against the
reward model of runs/reward on the shipped Python questions (runs/ppo).

Examples:
  python launch/ppo.py                                   # runs/sft + runs/reward -> runs/ppo (CPU, minutes)
  python launch/ppo.py rl.reward_model=null rl.reward_fn=train.rl.rewards:mentions_module rl.critic_init=policy
  python launch/ppo.py lora.enabled=true                 # the reference is the base with adapters off

Outputs: metrics.jsonl (reward_mean, reward_std, kl, entropy, clip_frac, value_loss, explained_var, response_len,
gen_tokens_per_s; eval_reward_mean on held-out prompts), rl_curves.png, generations.md (held-out
samples before and after), and kiln checkpoints whose weights are the policy's.
"""

import _bootstrap  # noqa: F401  (sys.path + launcher arguments)

import hydra
from omegaconf import DictConfig

from train.rl.config import register_rl_configs

register_rl_configs()


@hydra.main(config_path="../conf", config_name="ppo", version_base=None)
@_bootstrap.exit_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    from _rl import run

    run(cfg, "ppo")


if __name__ == "__main__":
    _bootstrap.check_overrides("ppo")
    main()
