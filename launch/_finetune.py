"""The part of launch/sft.py, launch/dpo.py and launch/reward.py after the trainer is built:
say what data the task read, train (stopping cleanly on SIGUSR1/SIGTERM), and summarise the
run through kiln's log (train/log.py)."""

import json
import os
import time

import _bootstrap

from train.config import exit_config_error
from train.errors import ConfigError
from train.log import logger, report_validation


def train_and_report(trainer, t0: float, summary=None) -> None:
    """``summary(result)``: the task's own lines after the validation loss (rank 0)."""
    b, cfg, log = trainer.backend, trainer.cfg, logger()
    read = trainer.task.data_summary()
    if b.is_main and read is not None and read[1] is not None:
        label, data = read
        log.info(f"{label}: {json.dumps(dict(data.counts))}")
        if data.skipped and data.skipped.total:
            log.info(f"skipped bad records: {dict(data.skipped.reasons)} (first: {data.skipped.examples})")
    trainer.stop_on_signals()  # SIGUSR1/SIGTERM (Slurm time limit, preemption): checkpoint and exit
    try:
        result = trainer.fit()
    except ConfigError as e:  # found at resume (a setting that changes what the saved state means)
        exit_config_error(cfg, e)
    if b.is_main:
        run_dir = os.path.abspath(cfg.run_dir)
        report_validation(result)
        for line in (summary(result) if summary else []):
            log.info(line)
        if result.get("generations"):
            log.info(f"generations:\n{result['generations']}")
        lines = [f"done in {time.time() - t0:.0f}s. Run directory: {run_dir}",
                 f"         checkpoints: {trainer.ckpt_root}"]
        if result.get("generations_path"):
            lines.append(f"         generations: {os.path.abspath(result['generations_path'])}")
        if result.get("plot"):
            lines.append(f"         loss plot:   {os.path.abspath(result['plot'])}")
        log.info("\n".join(lines))
    _bootstrap.leave(b)
