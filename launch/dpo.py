"""Preference optimisation (DPO, IPO, conservative DPO) of a kiln checkpoint.
`python launch/dpo.py` trains the default SFT run (runs/sft) on the shipped preference pairs.

Examples:
  python launch/dpo.py                                      # runs/sft -> runs/dpo (CPU, minutes)
  python launch/dpo.py init_from=runs/sft lora.enabled=true run_name=dpo-lora
  python launch/dpo.py dpo.loss=ipo dpo.beta=0.5 sft.paths='[my_pairs.jsonl]'
  torchrun --nproc_per_node 2 launch/dpo.py backend=fsdp
  deepspeed --num_gpus 2 launch/dpo.py backend=deepspeed backend.zero_stage=3

Records: {"prompt": ..., "chosen": ..., "rejected": ...} (the prompt a string or chat
messages ending with a user turn), or TRL's conversational chosen/rejected; JSONL, Parquet
or a local HF dataset directory. Outputs as for SFT: metrics.jsonl (val_loss,
reward_accuracy, reward_margin), the loss plot, checkpoints and the before/after table.
"""

import _bootstrap  # noqa: F401  (sys.path + launcher arguments)

import hydra
from omegaconf import DictConfig

from train.sft.config import register_sft_configs

register_sft_configs()


@hydra.main(config_path="../conf", config_name="dpo", version_base=None)
@_bootstrap.exit_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    from _preference import run

    run(cfg, "preference", "launch/dpo.py")


if __name__ == "__main__":
    _bootstrap.check_overrides("dpo")
    main()
