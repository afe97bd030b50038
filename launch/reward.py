"""Train a reward model (Bradley-Terry) on preference pairs from a kiln SFT checkpoint.
`python launch/reward.py` trains runs/sft's reward model on the shipped pairs (runs/reward).

Examples:
  python launch/reward.py                                   # runs/sft -> runs/reward (CPU, minutes)
  python launch/reward.py dpo.margin=0.5 sft.paths='[my_pairs.jsonl]'
  deepspeed --num_gpus 2 launch/reward.py backend=deepspeed backend.zero_stage=3

The model is the checkpoint's network with a scalar head (``value.weight``) on the last real
token of prompt + reply; the loss is -log sigmoid(r_chosen - r_rejected - margin).
metrics.jsonl reports the held-out pairwise accuracy (reward_accuracy) and mean margin; the
checkpoints are kiln checkpoints (the LM's weights plus the head).
"""

import _bootstrap  # noqa: F401  (sys.path + launcher arguments)

import hydra
from omegaconf import DictConfig

from train.sft.config import register_sft_configs

register_sft_configs()


@hydra.main(config_path="../conf", config_name="reward", version_base=None)
@_bootstrap.exit_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    from _preference import run

    run(cfg, "reward", "launch/reward.py")


if __name__ == "__main__":
    _bootstrap.check_overrides("reward")
    main()
