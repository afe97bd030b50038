"""RLHF with GRPO (train/tasks/rl.py). `python launch/grpo.py` optimises runs/sft against the
reward model of runs/reward on the shipped Python questions (runs/grpo).

Examples:
  python launch/grpo.py                                   # runs/sft + runs/reward -> runs/grpo (CPU, minutes)
  python launch/grpo.py rl.reward_model=null rl.reward_fn=train.rl.rewards:mentions_module
  python launch/grpo.py lora.enabled=true                 # the reference is the base with adapters off

Outputs: metrics.jsonl (reward_mean, reward_std, kl, entropy, clip_frac, response_len,
gen_tokens_per_s; eval_reward_mean on held-out prompts), rl_curves.png, generations.md (held-out
samples before and after), and kiln checkpoints whose weights are the policy's.
"""

import _bootstrap  # noqa: F401  (sys.path + launcher arguments)

import hydra
from omegaconf import DictConfig

from train.rl.config import register_rl_configs

register_rl_configs()


@hydra.main(config_path="../conf", config_name="grpo", version_base=None)
@_bootstrap.exit_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    from _rl import run

    run(cfg, "grpo")


if __name__ == "__main__":
    _bootstrap.check_overrides("grpo")
    main()
