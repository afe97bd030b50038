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

import json
import os
import time

import hydra
from omegaconf import DictConfig

from train.config import ConfigError, exit_config_error, validate
from train.sft.config import register_sft_configs, validate_sft

register_sft_configs()


@hydra.main(config_path="../conf", config_name="dpo", version_base=None)
@_bootstrap.exit_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    try:
        validate_sft(cfg)  # first: its init_from message says how to make the default checkpoint
        validate(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
    from train.sft.dpo_trainer import DPOTrainer
    from train.sft.records import BadRecord

    if cfg.task != "preference":
        exit_config_error(cfg, ConfigError("task", f"launch/dpo.py trains task=preference, got {cfg.task!r} "
                                                   "(launch/sft.py runs the other tasks)"))
    t0 = time.time()
    try:
        trainer = DPOTrainer(cfg)
    except (ConfigError, BadRecord) as e:
        exit_config_error(cfg, e)
    b = trainer.backend
    if b.is_main:
        d = trainer.pref
        print(f"[kiln] preference data: {json.dumps(dict(d.counts))}", flush=True)
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
        evals = [r for r in trainer.eval_history if "reward_accuracy" in r]
        if evals:
            first, last = evals[0], evals[-1]
            print(f"[kiln] held-out reward accuracy {first['reward_accuracy']:.3f} -> {last['reward_accuracy']:.3f}, "
                  f"margin {first['reward_margin']:.3f} -> {last['reward_margin']:.3f} "
                  f"(steps {first['step']} -> {last['step']})")
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
    _bootstrap.check_overrides("dpo")
    main()
