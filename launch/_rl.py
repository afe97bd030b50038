"""What launch/ppo.py and launch/grpo.py share: validate, then the one loop with the RL task
(train/tasks/rl.py), trained and reported as every fine-tuning launcher does it
(launch/_finetune.py: stops cleanly on SIGUSR1/SIGTERM, reports through kiln's log)."""

import time

from _finetune import train_and_report

from train.config import exit_config_error, validate
from train.errors import ConfigError


def summary(result: dict) -> list[str]:
    """The held-out reward, KL and reply length, first evaluation to last, and the speed of
    generation."""
    lines = []
    evals = result["evals"]
    if evals:
        a, z = min(evals), max(evals)
        lines.append(f"held-out reward {evals[a]['eval_reward_mean']:.3f} (step {a}) -> "
                     f"{evals[z]['eval_reward_mean']:.3f} (step {z}); KL to the reference "
                     f"{evals[z]['eval_kl']:.3f} nats/reply; reply length {evals[a]['eval_response_len']:.1f} -> "
                     f"{evals[z]['eval_response_len']:.1f}")
    tps = list(result["gen_tokens_per_s"].values())
    if tps:
        lines.append(f"generation: {sum(tps) / len(tps):.0f} tokens/s (mean over {len(tps)} rollout batches)")
    return lines


def run(cfg, algo: str) -> None:
    from train.rl.config import validate_rl

    try:
        if str(cfg.rl.algo) != algo:
            raise ConfigError("rl.algo", f"launch/{algo}.py runs rl.algo={algo}, got {cfg.rl.algo!r}")
        validate_rl(cfg)
        validate(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
    from train.tasks.rl import RLTask
    from train.trainer import Trainer

    t0 = time.time()
    try:
        trainer = Trainer(cfg, RLTask(cfg))
    except ConfigError as e:
        exit_config_error(cfg, e)
    train_and_report(trainer, t0, summary)
