"""Train a SentencePiece BPE tokenizer on text produced by the data pipeline.

  python launch/train_tokenizer.py tokenizer.vocab_size=32000 tokenizer.output=tok/web32k.model
  python launch/pretrain.py tokenizer.path=tok/web32k.model

The same `data` config as pretraining decides which documents (after every filter) the
tokenizer sees, so the tokenizer matches what the model will be trained on.
"""

import _bootstrap  # noqa: F401

import time

import hydra
from omegaconf import DictConfig

from train.config import register_configs, validate_or_exit

register_configs()


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_or_exit(cfg)
    from data_pipeline.pipeline import iter_texts
    from data_pipeline.tokenizer import train_tokenizer

    t0 = time.time()
    tok = train_tokenizer(iter_texts(cfg.data, cfg.tokenizer.train_max_docs), cfg.tokenizer.output,
                          vocab_size=cfg.tokenizer.vocab_size)
    print(f"[kiln] tokenizer with {tok.vocab_size} pieces written to {cfg.tokenizer.output} "
          f"in {time.time() - t0:.1f}s (bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}, "
          f"chat tokens {tok.control})")


if __name__ == "__main__":
    import sys

    _bootstrap.check_overrides("pretrain")
    # No Hydra output here: this is not a run, and the run directory's .hydra/config.yaml
    # belongs to the training run that may live there.
    sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    main()
