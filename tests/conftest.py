"""Shared fixtures: a real tokenizer trained once on the bundled corpus, and configs
composed through Hydra exactly as the launch scripts compose them."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "conf")
SAMPLE_WARC = os.path.join(REPO, "data_pipeline", "assets", "sample.warc.gz")
SAMPLE_LABELS = os.path.join(REPO, "data_pipeline", "assets", "sample_labels.jsonl")
sys.path.insert(0, REPO)

# Overrides that make a run take seconds on a CPU while exercising every part.
TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
    "data.seq_len=32", "train.micro_batch_size=4", "train.eval_sequences=8", "train.log_every=1",
    "train.sample_tokens=0", "optim.warmup_steps=2", "logger.plot=false",
]


@pytest.fixture
def one_thread():
    """Small models run faster on one thread than on two busy cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    from data_pipeline.config import DataConfig, SourceConfig
    from data_pipeline.pipeline import iter_texts
    from data_pipeline.tokenizer import train_tokenizer

    cfg = DataConfig(sources=[SourceConfig(paths=[SAMPLE_WARC])])
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(iter_texts(cfg, max_docs=120), path, vocab_size=1024)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from data_pipeline.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


def compose(overrides=(), config_name="pretrain"):
    """The config a launch script would see for these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


@pytest.fixture
def tiny_cfg(tmp_path, tokenizer_path):
    def make(*extra):
        return compose(TINY + [f"run_dir={tmp_path / 'run'}", f"tokenizer.path={tokenizer_path}", *extra])

    return make


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tokenizer_path):
    """Real checkpoints at steps 2 and 4 in each storage format (tests/ckpt_helpers.py)."""
    from tests.ckpt_helpers import make_native_runs

    return make_native_runs(tmp_path_factory, tokenizer_path)
