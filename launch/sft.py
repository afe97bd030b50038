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

import json
import os
import time

import hydra
from omegaconf import DictConfig

from train.config import ConfigError, exit_config_error, validate
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
    from train.sft.trainer import SFTTrainer

    t0 = time.time()
    try:
        trainer = SFTTrainer(cfg)
    except (ConfigError, BadRecord) as e:
        exit_config_error(cfg, e)
    b = trainer.backend
    if b.is_main and trainer.sft_data is not None:
        d = trainer.sft_data
        print(f"[kiln] sft data: {json.dumps(dict(d.counts))}", flush=True)
        if d.skipped and d.skipped.total:
            print(f"[kiln] skipped bad records: {dict(d.skipped.reasons)} (first: {d.skipped.examples})", flush=True)
    trainer.stop_on_signals()  # SIGUSR1/SIGTERM (Slurm time limit, preemption): checkpoint and exit
    result = trainer.fit()
    if b.is_main:
        run_dir = os.path.abspath(cfg.run_dir)
        vals = result["val_losses"]
        if vals:
            first, last = min(vals), max(vals)
            print(f"[kiln] validation loss {vals[first]:.3f} (step {first}) -> {vals[last]:.3f} (step {last})")
        if result.get("classification"):
            c = result["classification"]
            print(f"[kiln] held-out classification ({c['n']} examples): accuracy={c['accuracy']:.3f} "
                  f"macro_f1={c['macro_f1']:.3f}")
        if result.get("generations"):
            print(result["generations"])
        print(f"[kiln] done in {time.time() - t0:.0f}s. Run directory: {run_dir}")
        print(f"         checkpoints: {trainer.ckpt_root}")
        if result.get("generations_path"):
            print(f"         generations: {os.path.abspath(result['generations_path'])}")
        if result.get("plot"):
            print(f"         loss plot:   {os.path.abspath(result['plot'])}")
    _bootstrap.leave(b)


if __name__ == "__main__":
    _bootstrap.check_overrides("sft")
    main()
