"""What launch/dpo.py and launch/reward.py share: validate, build the trainer for the task,
train, and report the held-out reward accuracy and margin."""

import json
import os
import time

import _bootstrap

from train.config import ConfigError, exit_config_error, validate
from train.sft.config import validate_sft


def run(cfg, task: str, entry: str) -> None:
    try:
        validate_sft(cfg)  # first: its init_from message says how to make the default checkpoint
        validate(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
    from train.sft.dpo_trainer import DPOTrainer, RewardTrainer
    from train.sft.records import BadRecord

    if cfg.task != task:
        exit_config_error(cfg, ConfigError("task", f"{entry} trains task={task}, got {cfg.task!r} "
                                                   "(launch/sft.py runs the instruction and classification tasks)"))
    t0 = time.time()
    try:
        trainer = (DPOTrainer if task == "preference" else RewardTrainer)(cfg)
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
