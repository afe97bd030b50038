"""What launch/ppo.py and launch/grpo.py share: validate, build the RL trainer, train, report."""

import logging
import os
import time

import _bootstrap

from train.config import exit_config_error, validate
from train.errors import ConfigError


def run(cfg, algo: str) -> None:
    from train.rl.config import validate_rl

    logging.basicConfig(level=logging.INFO, format="[kiln] %(message)s")
    try:
        if str(cfg.rl.algo) != algo:
            raise ConfigError("rl.algo", f"launch/{algo}.py runs rl.algo={algo}, got {cfg.rl.algo!r}")
        validate_rl(cfg)
        validate(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
    from train.rl.loop import RLTrainer

    t0 = time.time()
    try:
        trainer = RLTrainer(cfg)
    except ConfigError as e:
        exit_config_error(cfg, e)
    trainer_result = None
    try:
        trainer_result = trainer.fit()
    except ConfigError as e:
        exit_config_error(cfg, e)
    r = trainer_result
    if not trainer.backend.is_main:  # one summary per run, not one per rank
        _bootstrap.leave(trainer.backend)
        return
    evals = r["evals"]
    if evals:
        a, z = min(evals), max(evals)
        print(f"[kiln] held-out reward {evals[a]['eval_reward_mean']:.3f} (step {a}) -> "
              f"{evals[z]['eval_reward_mean']:.3f} (step {z}); KL to the reference {evals[z]['eval_kl']:.3f} "
              f"nats/reply; reply length {evals[a]['eval_response_len']:.1f} -> {evals[z]['eval_response_len']:.1f}")
    steps = r["steps"]
    if steps:
        tps = [m["gen_tokens_per_s"] for m in steps.values()]
        print(f"[kiln] generation: {sum(tps) / len(tps):.0f} tokens/s (mean over {len(tps)} rollout batches)")
    run_dir = os.path.abspath(cfg.run_dir)
    print(f"[kiln] done in {time.time() - t0:.0f}s. Run directory: {run_dir}")
    if os.path.exists(os.path.join(run_dir, "generations.md")):
        print(f"         generations: {os.path.join(run_dir, 'generations.md')}")
    if r.get("plot"):
        print(f"         curves:      {os.path.abspath(r['plot'])}")
    _bootstrap.leave(trainer.backend)
