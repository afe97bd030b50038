"""One task object per training job, run by the one loop (``train/trainer.py``); the
interface is ``train/tasks/base.py``."""
