"""Review fixes of the data pipeline (issue 26): a done marker cut short by a crash is never
taken as done (the file is redone, and a reader names the marker); a bad quality-model
setting fails early naming its key or its file."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from data_pipeline import global_dedup
from data_pipeline.runner import is_done, read_done, write_done

CUT_SHORT = '{"input": "x.jsonl.gz", "output": "y.jsonl.gz", "do'  # what a crash mid-write leaves


def _jsonl(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t, "url": ""}) + "\n")


def test_a_cut_short_done_marker_is_not_done_and_the_dedup_filter_redoes_the_file(tmp_path):
    src, work, out_dir = tmp_path / "in", tmp_path / "work", tmp_path / "out"
    src.mkdir()
    _jsonl(src / "a.jsonl.gz", ["one", "two", "three"])
    (work / "remove").mkdir(parents=True)
    np.save(work / "remove" / "000000.npy", np.asarray([1], dtype=np.int64))
    out_dir.mkdir()
    out = out_dir / "a.jsonl.gz"
    out.write_bytes(b"a crash left this")
    (out_dir / "a.jsonl.gz.done").write_text(CUT_SHORT)
    assert not is_done(str(out))
    with pytest.raises(ValueError, match="a.jsonl.gz.done: corrupt done marker"):
        read_done(str(out))

    global_dedup.stage_filter([str(src / "a.jsonl.gz")], str(work), str(out_dir), 0, 1)
    assert is_done(str(out))
    assert read_done(str(out))["docs"] == 2 and read_done(str(out))["removed_as_duplicates"] == 1
    assert [d["text"] for d in global_dedup.read_docs(str(out))] == ["one", "three"]
    assert sorted(os.listdir(out_dir)) == ["a.jsonl.gz", "a.jsonl.gz.done"]  # no temporary left


def test_token_shards_with_a_cut_short_marker_is_an_error_naming_the_marker(tmp_path):
    from data_pipeline.token_shards import TokenShards, read_token_shard, write_token_rows

    manifest = {"dtype": "uint16", "tokenizer": "t", "vocab_size": 10}
    rows = [{"id": "a", "url": "", "ids": np.asarray([1, 2, 0])}, {"id": "b", "url": "", "ids": np.asarray([3, 0])}]
    counts = write_token_rows(rows, str(tmp_path / "s"), manifest)
    write_done(str(tmp_path / "s.bin"), counts)
    assert len(TokenShards([str(tmp_path)]).files) == 1  # whole marker: read
    marker = tmp_path / "s.bin.done"
    marker.write_text(marker.read_text()[:20])
    with pytest.raises(ValueError, match=r"s\.bin\.done: corrupt done marker"):
        TokenShards([str(tmp_path)])
    with pytest.raises(ValueError, match=r"s\.bin\.done: corrupt done marker"):
        list(read_token_shard(str(tmp_path / "s.bin")))


def test_a_rerun_of_a_prepare_task_redoes_a_file_whose_marker_is_cut_short(tmp_path):
    from tests.test_pipeline_prepare import inputs, run

    paths, out = inputs(tmp_path, 1), tmp_path / "out"
    run(out, paths)
    shard = out / "web-00000-part0.jsonl.gz"
    whole = read_done(str(shard))
    shard.write_bytes(b"partial garbage")
    (out / "web-00000-part0.jsonl.gz.done").write_text(json.dumps(whole)[:30])
    run(out, paths)
    assert read_done(str(shard))["docs"] == whole["docs"] == 4
    with gzip.open(shard, "rt") as f:
        assert len(f.readlines()) == 4


def test_replace_heuristics_without_the_quality_model_is_a_config_error():
    from tests.conftest import compose
    from train.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.quality_model.replace_heuristics"):
        validate(compose(["data.quality_model.replace_heuristics=true"]))


@pytest.mark.parametrize("stored", [1.5, -0.1, float("nan")])
def test_a_model_file_threshold_outside_0_1_is_an_error_naming_the_file(tmp_path, stored):
    from data_pipeline.filters.quality_model import QualityModel, QualityModelFilter

    path = str(tmp_path / "bad.safetensors")
    QualityModel(buckets=16, threshold=stored).save(path)
    with pytest.raises(ValueError, match=r"bad\.safetensors: the stored threshold must be in \[0, 1\]"):
        QualityModel.load(path)
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        QualityModelFilter(model_path=path)
    ok = str(tmp_path / "ok.safetensors")
    QualityModel(buckets=16, threshold=0.25).save(ok)
    assert QualityModelFilter(model_path=ok).threshold == 0.25


def test_quality_training_is_library_code_the_launcher_and_benchmark_call(tmp_path):
    import ast

    from data_pipeline.quality_training import NeedBothLabels, choose_threshold, evaluate, train_quality_model
    from tests.conftest import REPO

    scores, labels = [0.9, 0.2, 0.7, 0.4, 0.35], ["good", "spam", "good", "good", "junk"]
    t = choose_threshold(scores, labels, "good")
    said = evaluate(scores, labels, "good", t)
    assert said["junk_kept"] == 0 and said["recall_keep"] == 1.0 and 0.35 < t < 0.4
    with pytest.raises(NeedBothLabels):
        train_quality_model(["a page", "another"], ["good", "good"], "good", str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="threshold must be in"):
        train_quality_model(["a", "b"], ["good", "spam"], "good", str(tmp_path / "m.safetensors"), threshold=2.0)
    for script in ("launch/train_quality_model.py", "benchmarks/bench_filter_recall.py"):
        tree = ast.parse(open(os.path.join(REPO, script), encoding="utf-8").read())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not defined & {"read_labelled", "evaluate", "choose_threshold", "train_quality_model"}, script
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "train_quality_model" in calls, script
        assert "subprocess" not in {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
