"""What launch/dpo.py and launch/reward.py share: validate, build the trainer with the task,
train, and report the held-out reward accuracy and margin."""

import time

from train.config import exit_config_error, validate
from train.errors import ConfigError
from train.sft.config import validate_sft


def run(cfg, task: str, entry: str) -> None:
    try:
        validate_sft(cfg)  # first: its init_from message says how to make the default checkpoint
        validate(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
    from train.sft.records import BadRecord
    from train.tasks import for_config
    from train.trainer import Trainer

    if cfg.task != task:
        exit_config_error(cfg, ConfigError("task", f"{entry} trains task={task}, got {cfg.task!r} "
                                                   "(launch/sft.py runs the instruction and classification tasks)"))
    t0 = time.time()
    try:
        trainer = Trainer(cfg, for_config(cfg))
    except (ConfigError, BadRecord) as e:
        exit_config_error(cfg, e)
    from _finetune import train_and_report

    def rewards(_result) -> list[str]:
        evals = trainer.task.eval_history
        if not evals:
            return []
        first, last = evals[0], evals[-1]
        return [f"held-out reward accuracy {first['reward_accuracy']:.3f} -> {last['reward_accuracy']:.3f}, "
                f"margin {first['reward_margin']:.3f} -> {last['reward_margin']:.3f} "
                f"(steps {first['step']} -> {last['step']})"]

    train_and_report(trainer, t0, rewards)
