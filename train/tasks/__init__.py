"""One task object per training job, run by the one loop (``train/trainer.py``); the
interface is ``train/tasks/base.py``. ``for_config`` picks the task a config's ``task`` key
names (a pretraining config has none)."""

from __future__ import annotations

from train.tasks.base import Task


def for_config(cfg) -> Task:
    """The task of ``cfg.task`` (pretraining when the config has no ``task`` key)."""
    name = cfg.get("task") if hasattr(cfg, "get") else getattr(cfg, "task", None)
    if name is None:
        from train.tasks.pretrain import PretrainTask

        return PretrainTask(cfg)
    if name in ("preference", "reward"):
        from train.tasks.preference import PreferenceTask, RewardTask

        return (PreferenceTask if name == "preference" else RewardTask)(cfg)
    from train.tasks.sft import ClassificationTask, ContinuedPretrainingTask, InstructionTask

    tasks = {"instruction": InstructionTask, "classification": ClassificationTask,
             "continued_pretraining": ContinuedPretrainingTask}
    if name not in tasks:
        from train.errors import ConfigError

        raise ConfigError("task", f"unknown task {name!r} ({' | '.join([*tasks, 'preference', 'reward'])})")
    return tasks[name](cfg)
