"""Pretrain a causal LM. `python launch/pretrain.py` runs the embedded CPU default.

Examples:
  python launch/pretrain.py model=125m optim.lr=3e-4 train.max_steps=100
  torchrun --nproc_per_node 2 launch/pretrain.py backend=fsdp
  deepspeed --num_gpus 2 launch/pretrain.py backend=deepspeed backend.zero_stage=3
"""

import _bootstrap  # sys.path + launcher arguments

import os
import time

import hydra
from omegaconf import DictConfig

from train.config import exit_config_error, register_configs, validate_or_exit
from train.errors import ConfigError

register_configs()


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
@_bootstrap.exit_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    validate_or_exit(cfg)
    from train.log import logger, report_validation
    from train.trainer import Trainer

    t0 = time.time()
    try:
        trainer = Trainer(cfg)
    except ConfigError as e:  # found while setting up (a tokenizer that does not fit the shards, ...)
        exit_config_error(cfg, e)
    trainer.stop_on_signals()  # SIGUSR1/SIGTERM (Slurm time limit, preemption): checkpoint and exit
    try:
        result = trainer.fit()
    except ConfigError as e:  # found at resume (a setting that changes what the saved state means)
        exit_config_error(cfg, e)
    b = trainer.backend
    log = logger()
    stopped = result.get("stopped", False)  # the scheduler wants the job gone soon: no sample
    if result["final_step"] > result["start_step"] and cfg.train.sample_tokens > 0 and not stopped:
        text = trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens)  # every rank: weights may be sharded
        log.info(f"sample: {text}")
    if b.is_main:
        report_validation(result)
        run_dir = os.path.abspath(cfg.run_dir)
        lines = [f"done in {time.time() - t0:.0f}s. Run directory: {run_dir}",
                 f"         checkpoints: {os.path.join(run_dir, 'checkpoints')} (latest: {trainer.ckpt_root}/latest)",
                 f"         metrics:     {os.path.join(run_dir, 'metrics.jsonl')}"]
        if result.get("plot"):
            lines.append(f"         loss plot:   {os.path.abspath(result['plot'])}")
        if result.get("data_report"):
            lines.append(f"         data report: {os.path.abspath(result['data_report'])}")
        lines.append(f"         tokenizer:   {os.path.abspath(trainer.tokenizer.path)}")
        lines.append(f"         config:      {os.path.join(run_dir, '.hydra', 'config.yaml')}")
        log.info("\n".join(lines))
    _bootstrap.leave(b)


if __name__ == "__main__":
    _bootstrap.check_overrides("pretrain")
    main()
