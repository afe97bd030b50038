"""`python launch/sft.py` with no arguments: fine-tunes runs/default, or says how to make it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_without_a_pretraining_run_it_says_how_to_make_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sft.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2
    assert "init_from" in p.stderr and "runs/default" in p.stderr and "python launch/pretrain.py" in p.stderr


def test_a_misspelt_value_names_the_key(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sft.py"), "sft.mask=assistant_only",
                        f"init_from={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2 and "sft.mask" in p.stderr
