"""Fine-tune a kiln checkpoint. `python launch/sft.py` fine-tunes the default pretraining run.

Examples:
  python launch/sft.py                                          # runs/default -> runs/sft (CPU, minutes)
  python launch/sft.py init_from=runs/big lora.enabled=true lora.rank=16
  python launch/sft.py task=classification sft.paths='[${asset:sft/pipeline_keep.jsonl}]' run_name=keep
  python launch/sft.py task=continued_pretraining data=prepared
  torchrun --nproc_per_node 2 launch/sft.py backend=fsdp
  deepspeed --num_gpus 2 launch/sft.py backend=deepspeed backend.zero_stage=3
"""

import _bootstrap  # noqa: F401  (sys.path + launcher arguments)

import time

import hydra
from omegaconf import DictConfig

from train.config import exit_config_error, validate
from train.errors import ConfigError
from train.sft.config import register_sft_configs, validate_sft

register_sft_configs()


@hydra.main(config_path="../conf", config_name="sft", version_base=None)
@_bootstrap.exit_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    try:
        validate_sft(cfg)  # first: its init_from message says how to make the default checkpoint
        validate(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
    from train.sft.records import BadRecord
    from train.tasks import for_config
    from train.trainer import Trainer

    t0 = time.time()
    try:
        trainer = Trainer(cfg, for_config(cfg))
    except (ConfigError, BadRecord) as e:
        exit_config_error(cfg, e)
    from _finetune import train_and_report

    def classification(result) -> list[str]:
        c = result.get("classification")
        return [f"held-out classification ({c['n']} examples): accuracy={c['accuracy']:.3f} "
                f"macro_f1={c['macro_f1']:.3f}"] if c else []

    train_and_report(trainer, t0, classification)


if __name__ == "__main__":
    _bootstrap.check_overrides("sft")
    main()
