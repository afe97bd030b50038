"""The part of launch/sft.py, launch/dpo.py and launch/reward.py after the trainer is built:
say what data it read, train (stopping cleanly on SIGUSR1/SIGTERM), and summarise the run."""

import json
import os
import time

import _bootstrap

from train.config import ConfigError, exit_config_error


def train_and_report(trainer, data, label: str, t0: float, summary=None) -> None:
    """``data``: an object with ``counts`` and ``skipped`` (or None); ``summary(result)``: the
    task's own lines after the validation loss (rank 0)."""
    b, cfg = trainer.backend, trainer.cfg
    if b.is_main and data is not None:
        print(f"[kiln] {label}: {json.dumps(dict(data.counts))}", flush=True)
        if data.skipped and data.skipped.total:
            print(f"[kiln] skipped bad records: {dict(data.skipped.reasons)} (first: {data.skipped.examples})",
                  flush=True)
    trainer.stop_on_signals()  # SIGUSR1/SIGTERM (Slurm time limit, preemption): checkpoint and exit
    try:
        result = trainer.fit()
    except ConfigError as e:  # found at resume (a setting that changes what the saved state means)
        exit_config_error(cfg, e)
    if b.is_main:
        run_dir = os.path.abspath(cfg.run_dir)
        _bootstrap.print_validation(result)
        for line in (summary(result) if summary else []):
            print(line)
        if result.get("generations"):
            print(result["generations"])
        print(f"[kiln] done in {time.time() - t0:.0f}s. Run directory: {run_dir}")
        print(f"         checkpoints: {trainer.ckpt_root}")
        if result.get("generations_path"):
            print(f"         generations: {os.path.abspath(result['generations_path'])}")
        if result.get("plot"):
            print(f"         loss plot:   {os.path.abspath(result['plot'])}")
    _bootstrap.leave(b)
