"""Tokenized shards: written by prepare_data as a Slurm-style array, read by position.

The global batch of step k is a pure function of (seed, k): the same rows for any world
size, each rank reading only its own; the stream position is the whole state, so resume is
exact on any world size (2 -> 1 and 1 -> 2 processes, real launches)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.token_shards import TokenMixture, TokenShards, TokenWindows, permute
from tests.conftest import REPO, SAMPLE_WARC
from train.data import GlobalBatchSlicer


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_permutation_is_a_bijection_and_depends_on_the_key(n):
    a = [permute(i, n, key=1) for i in range(n)]
    assert sorted(a) == list(range(n))
    if n > 10:
        assert a != [permute(i, n, key=2) for i in range(n)] and a != list(range(n))


def prepare(out_dir, tokenizer_path, inputs, tasks=1, fmt="jsonl"):
    """prepare_data --format tokens as an array of ``tasks`` tasks; WARC input runs the sample's
    filter chain, JSONL input none."""
    preset = "data=sample" if fmt == "warc" else "data=prepared"
    for task in range(tasks):
        p = subprocess.run([sys.executable, "launch/prepare_data.py", "--output-dir", str(out_dir), "--format", "tokens",
                            "--tokenizer", tokenizer_path, "--input", *inputs, "--input-format", fmt,
                            "--shard-index", str(task), "--num-shards", str(tasks), preset],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def write_jsonl(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"{os.path.basename(path)}-{i}", "text": t}) + "\n")
    return str(path)


TEXTS = [f"Document {i} talks about {w} and the Python interpreter, line {i}." * (1 + i % 4)
         for i, w in enumerate(["lists", "dicts", "sets", "tuples", "files", "paths", "sockets", "threads"] * 6)]


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, tokenizer_path):
    d = tmp_path_factory.mktemp("tokens")
    inputs = [write_jsonl(d / f"in{i}.jsonl.gz", TEXTS[i::3]) for i in range(3)]
    out = d / "out"
    first = prepare(out, tokenizer_path, inputs, tasks=2)
    again = prepare(out, tokenizer_path, inputs, tasks=2)  # a rerun of the array skips finished files
    assert "1 files written" in first and "0 files written, 1 already done" in again
    return out


def test_shards_hold_every_document_followed_by_eos(shards_dir, tokenizer):
    sh = TokenShards([str(shards_dir)])
    assert len(sh.files) == 3 and sh.tokenizer_path == str(shards_dir / "tokenizer.model")
    got = sh.tokens(0, sh.total)
    expected = []
    for f in sh.files:  # name order: in0, in1, in2
        i = int(os.path.basename(f).split("-")[2][2:].split(".")[0])
        for t in TEXTS[i::3]:
            expected += tokenizer.encode(t, bos=False, eos=True)
    assert got.tolist() == expected and sh.arrays[0].dtype == np.uint16
    assert len(sh.doc_ends) == len(TEXTS) and int(sh.doc_ends[-1]) == sh.total


def test_windows_overlap_by_one_and_splits_are_disjoint(shards_dir):
    sh = TokenShards([str(shards_dir)])
    T = 16
    train = TokenWindows(sh, T, "train", 0.1, seed=3)
    val = TokenWindows(sh, T, "val", 0.1, seed=3)
    n = (sh.total - 1) // T
    assert train.count + val.count == n and val.count == round(n * 0.1)
    seen = sorted(train.window_index(p) for p in range(train.count))
    assert seen == list(range(train.count))  # each train window once per epoch
    assert [train.window_index(p) for p in range(train.count)] != seen  # shuffled
    assert [val.window_index(p) for p in range(val.count)] == list(range(train.count, n))
    row = train.row(0)
    w = train.window_index(0)
    assert row["tokens"].tolist() == sh.tokens(w * T, w * T + T + 1).tolist()
    nxt = sh.tokens((w + 1) * T, (w + 1) * T + T + 1)
    assert int(row["tokens"][-1]) == int(nxt[0])  # the last target is the next window's first input
    assert row["doc_ids"][0] == 0 and bool((row["doc_ids"].diff() >= 0).all())
    assert train.epoch == 0 and train.window_index(train.count) != train.window_index(0) or train.count == 1


@pytest.mark.parametrize("world,micro,accum", [(2, 2, 1), (4, 1, 2), (2, 1, 2)])
def test_global_batch_is_the_same_rows_for_any_world_size(shards_dir, world, micro, accum):
    sh = TokenShards([str(shards_dir)])
    ref = GlobalBatchSlicer(TokenWindows(sh, 16, "train", 0.1, seed=5), micro * world, accum, 0, 1)
    ranks = [GlobalBatchSlicer(TokenWindows(sh, 16, "train", 0.1, seed=5), micro, accum, r, world)
             for r in range(world)]
    for _ in range(5):
        for _ in range(accum):
            want = next(ref)["input"]
            got = torch.cat([next(r)["input"] for r in ranks])
            assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    states = {json.dumps(r.state_dict()) for r in ranks}
    assert states == {json.dumps(ref.state_dict())}  # one global position
    resumed = GlobalBatchSlicer(TokenWindows(sh, 16, "train", 0.1, seed=5), micro * world, accum, 0, 1)
    resumed.load_state_dict(ref.state_dict())
    assert torch.equal(next(resumed)["input"], next(ref)["input"])


def test_mixture_gives_each_source_its_token_share(shards_dir):
    a = TokenWindows(TokenShards([str(shards_dir)]), 8, "train", 0.0, seed=1)
    b = TokenWindows(TokenShards([str(shards_dir)]), 8, "train", 0.0, seed=2)
    mix = TokenMixture([a, b], [3.0, 1.0])
    mix.take_rows(400, [])
    assert (a.position, b.position) == (300, 100)
    state = mix.state_dict()
    rows = mix.take_rows(8, range(8))
    again = TokenMixture([TokenWindows(a.shards, 8, "train", 0.0, seed=1),
                          TokenWindows(b.shards, 8, "train", 0.0, seed=2)], [3.0, 1.0])
    again.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(rows[i]["tokens"], r["tokens"]) for i, r in again.take_rows(8, range(8)).items())


def test_a_tokenizer_other_than_the_shards_one_is_refused_naming_both(shards_dir, tiny_cfg, tmp_path):
    from data_pipeline.config import DataConfig, SourceConfig
    from data_pipeline.pipeline import iter_texts
    from data_pipeline.tokenizer import train_tokenizer
    from train.config import ConfigError
    from train.trainer import Trainer

    other = str(tmp_path / "other.model")
    train_tokenizer(iter_texts(DataConfig(sources=[SourceConfig(paths=[SAMPLE_WARC])]), 60), other, vocab_size=600)
    cfg = tiny_cfg("data=tokens", f"data.sources.0.paths=[{shards_dir}]", f"tokenizer.path={other}")
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert e.value.key == "tokenizer.path" and other in str(e.value) and "web-00000-in0.bin" in str(e.value)


TINY_RUN = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
            "data.seq_len=32", "train.grad_accum_steps=2", "train.eval_every=2", "train.eval_sequences=8",
            "train.log_every=1", "train.sample_tokens=0", "logger.plot=false", "train.max_steps=10",
            "checkpoint.every=5", "optim.warmup_steps=2", "optim.lr=3e-3", "data=tokens"]


@pytest.fixture(scope="module")
def sample_tokens(tmp_path_factory, tokenizer_path):
    out = tmp_path_factory.mktemp("sample_tokens")
    prepare(out, tokenizer_path, [SAMPLE_WARC], fmt="warc")
    return out


def test_exact_resume_across_world_sizes_with_token_shards(sample_tokens, tmp_path):
    from tests.test_distributed import TOL, assert_close, launch, losses

    common = TINY_RUN + [f"data.sources.0.paths=[{sample_tokens}]"]
    ref = tmp_path / "ref"
    launch("python", common + [f"run_dir={ref}", "train.micro_batch_size=4"])
    want = losses(ref)
    # 2 processes for steps 1-5, then 1 process for 6-10
    two_one = tmp_path / "two-one"
    launch("torchrun", common + [f"run_dir={two_one}", "train.micro_batch_size=2", "train.stop_at_step=5"])
    out = launch("python", common + [f"run_dir={two_one}", "train.micro_batch_size=4"])
    assert "resumed from" in out
    # 1 process for steps 1-5, then 2 processes (ZeRO-3) for 6-10
    one_two = tmp_path / "one-two"
    launch("python", common + [f"run_dir={one_two}", "train.micro_batch_size=4", "train.stop_at_step=5"])
    out = launch("deepspeed", common + [f"run_dir={one_two}", "train.micro_batch_size=2", "backend.zero_stage=3"])
    assert "resumed from" in out and "backend=deepspeed" in out
    for run in (two_one, one_two):
        assert_close(losses(run), want, range(1, 11))
        assert_close(losses(run, "eval"), losses(ref, "eval"), [0, 2, 4, 6, 8, 10])
    assert abs(losses(one_two)[10] - want[10]) <= TOL
    with open(ref / "checkpoints" / "step_00000005" / "trainer_state.json") as f:
        a = json.load(f)["data"]
    with open(two_one / "checkpoints" / "step_00000005" / "trainer_state.json") as f:
        b = json.load(f)["data"]
    assert a == b == [{"stream": {"position": 40}, "consumed": 0, "global": True}]  # 5 steps x 8 windows
