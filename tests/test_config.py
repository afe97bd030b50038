import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import REPO, compose
from train.config import ConfigError, validate


def test_default_config_composes_and_validates():
    cfg = compose()
    validate(cfg)
    assert cfg.model.d_model == 256 and cfg.backend.name == "single"
    assert cfg.data.sources[0].paths[0].endswith("sample.warc.gz")
    assert os.path.exists(cfg.data.sources[0].paths[0])


def test_fineweb_preset_composes_and_validates():
    cfg = compose(["data=fineweb"])
    validate(cfg)
    assert (cfg.data.name, cfg.data.words) == ("fineweb", "spacy")


def test_readme_override_example_composes():
    cfg = compose(["model=125m", "optim.lr=3e-4", "train.max_steps=100"])
    validate(cfg)
    assert (cfg.model.d_model, cfg.optim.lr, cfg.train.max_steps) == (768, 3e-4, 100)


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=0.1", "lrr"),
    ("model.d_modell=64", "d_modell"),
    ("train.max_steps=ten", "max_steps"),
])
def test_misspelt_key_or_wrong_type_fails_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert key in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("overrides,key", [
    (["model.n_heads=7"], "model.n_heads"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["optim.lr=-1"], "optim.lr"),
    (["data.seq_len=1024"], "data.seq_len"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["backend.zero_stage=4"], "backend.zero_stage"),
    (["resume=/no/such/dir"], "resume"),
    (["tokenizer.path=/no/such.model"], "tokenizer.path"),
    (["train.data_sharding=sequences", "data.num_workers=2"], "data.num_workers"),
    (["train.data_sharding=random"], "train.data_sharding"),
    (["data.words=nltk"], "data.words"),
])
def test_invalid_value_fails_validation_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides))
    assert e.value.key == key
    assert str(e.value).startswith(f"config error: {key}:")


def test_cli_rejects_bad_config_before_any_heavy_work(tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "launch/pretrain.py", "model.n_heads=7", f"run_dir={run_dir}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "model.n_heads" in p.stderr
    assert not run_dir.exists()  # failed before any work, and left no empty run directory
    p = subprocess.run([sys.executable, "launch/pretrain.py", "optim.lrr=1", f"run_dir={run_dir}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "lrr" in p.stderr and "config error" in p.stderr
    assert not run_dir.exists()
