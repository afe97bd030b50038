"""launch/prepare_data.py: sharded tasks, atomic outputs, reruns skip finished work, the
trainer reads the result; and the run report."""

from __future__ import annotations

import collections
import glob
import importlib.util
import json
import os

import pytest

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.pipeline import document_stream
from data_pipeline.readers import JsonlReader, ParquetReader
from data_pipeline.report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(REPO, "launch", "prepare_data.py"))
prepare_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_data)

# Only two steps, so the expected survivors are easy to state.
OVERRIDES = [f"data.{k}.enabled=false" for k in ("url_filter", "langid", "gopher_repetition", "c4_quality",
                                                  "fineweb_quality", "bad_words", "minhash_dedup", "pii")]
OVERRIDES += ["data.gopher_quality.enabled=true", "data.exact_dedup.enabled=true"]

GOOD = "The river and the stone garden were quiet in the morning, with letters on the window. " * 6


def inputs(tmp_path, n_files=3):
    paths = []
    for f in range(n_files):
        p = tmp_path / "in" / f"part{f}.jsonl"
        p.parent.mkdir(exist_ok=True)
        rows = [{"id": f"f{f}-good{i}", "text": f"Document {f}.{i}. " + GOOD} for i in range(4)]
        rows += [{"id": f"f{f}-short", "text": "too short"}, {"id": f"f{f}-dup", "text": "Document 0.0. " + GOOD}]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(p))
    return paths


def run(out, paths, *extra):
    return prepare_data.main(["--output-dir", str(out), "--input", *paths, "--input-format", "jsonl", *extra,
                              *OVERRIDES])


def test_tasks_split_files_and_write_filtered_shards_with_done_markers(tmp_path):
    paths, out = inputs(tmp_path), tmp_path / "out"
    run(out, paths, "--shard-index", "0", "--num-shards", "2")
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "*.jsonl.gz"))) == \
        ["web-00000-part0.jsonl.gz", "web-00002-part2.jsonl.gz"]
    run(out, paths, "--shard-index", "1", "--num-shards", "2")
    shards = sorted(glob.glob(str(out / "*.jsonl.gz")))
    assert len(shards) == 3 and all(os.path.exists(s + ".done") for s in shards)
    ids = [d.id for d in JsonlReader(shards)]
    # short docs fail Gopher; the "dup" of part0 duplicates f0-good0 inside part0 only (dedup is per task file)
    expected = [f"f{f}-good{i}" for f in range(3) for i in range(4)] + ["f1-dup", "f2-dup"]
    assert sorted(ids) == sorted(expected)
    with open(shards[0] + ".done") as f:
        stats = json.load(f)
    assert stats["docs"] == 4 and {n: st for n, st, _ in stats["steps"]}["gopher_quality"]["removed_by_reason"] == {"gopher_short_doc": 1}


def test_rerun_skips_finished_files_and_redoes_unfinished_ones(tmp_path):
    paths, out = inputs(tmp_path, 2), tmp_path / "out"
    run(out, paths)
    first = out / "web-00000-part0.jsonl.gz"
    mtime = os.path.getmtime(first)
    os.remove(str(out / "web-00001-part1.jsonl.gz.done"))  # as if the task died after writing, before marking
    (out / "web-00001-part1.jsonl.gz").write_bytes(b"partial garbage")
    run(out, paths)
    assert os.path.getmtime(first) == mtime
    assert len(list(JsonlReader(str(out / "web-00001-part1.jsonl.gz")))) == 5


def test_slurm_array_variables_pick_the_shard(tmp_path, monkeypatch):
    paths, out = inputs(tmp_path), tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    run(out, paths)
    assert [os.path.basename(p) for p in glob.glob(str(out / "*.jsonl.gz"))] == ["web-00001-part1.jsonl.gz"]


def test_trainer_reads_prepared_shards_without_refiltering(tmp_path):
    paths, out = inputs(tmp_path, 2), tmp_path / "out"
    run(out, paths)
    cfg = DataConfig(sources=[SourceConfig(paths=[str(out / "*.jsonl.gz")], format="jsonl", steps=False)])
    docs = list(document_stream(cfg, loop=False))
    assert len(docs) == 9 and all(d.text.startswith("Document") for d in docs)


def test_parquet_output_and_summary_report(tmp_path):
    paths, out = inputs(tmp_path, 2), tmp_path / "out"
    run(out, paths, "--format", "parquet")
    shards = sorted(glob.glob(str(out / "*.parquet")))
    assert len(shards) == 2 and len(list(ParquetReader(shards))) == 9
    prepare_data.main(["--output-dir", str(out), "--summarize"])
    stats = json.loads((out / "report" / "stats.json").read_text())
    assert stats["jsonl_reader"]["seen"] == 12 and stats["gopher_quality"]["removed"] == 2
    assert stats["exact_dedup"]["removed_by_reason"] == {"exact_duplicate": 1}


def test_write_report_tables_chart_and_examples(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(paths=inputs(tmp_path, 1), format="jsonl")])
    cfg.gopher_quality.enabled = cfg.langid.enabled = True
    s = document_stream(cfg, loop=False)
    list(s)
    write_report([s.reader, *s.steps], str(tmp_path / "rep"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| gopher_quality | 6 | 5 | 1 |" in md
    assert "### gopher_quality: gopher_short_doc" in md and "too short" in md
    assert "## By language" in md and "| langid |" in md
    assert (tmp_path / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_prepared_data_config_reads_shards_without_steps(tmp_path):
    from hydra import compose, initialize_config_dir

    from data_pipeline.pipeline import build_steps
    from train.config import register_configs

    paths, out = inputs(tmp_path, 2), tmp_path / "out"
    run(out, paths)
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose(config_name="pretrain", overrides=["data=prepared", f"data.sources.0.paths=[{out}/*.jsonl.gz]"]).data
    assert build_steps(cfg) == [] and cfg.sources[0].steps is False
    assert len(list(document_stream(cfg, loop=False))) == 9


def test_audit_accounts_for_every_record_and_why_dropped_answers_by_url(tmp_path):
    """The shipped sample through the full default chain with --audit: each input record is
    either in the output or in the audit (reader drops included), the audit's counts equal
    the steps' counts, its offsets point at the record, and why_dropped names the reason."""
    import gzip
    import subprocess
    import sys

    from warcio.archiveiterator import ArchiveIterator

    from data_pipeline.audit import read_audits

    warc = os.path.join(REPO, "data_pipeline", "assets", "sample.warc.gz")
    out = tmp_path / "out"
    assert prepare_data.main(["--output-dir", str(out), "--input", warc, "--input-format", "warc",
                              "--audit", "drops"]) == 0
    (done,) = glob.glob(str(out / "*.done"))
    stats = json.load(open(done))
    rows = list(read_audits([stats["audit"]["path"]]))
    removed = {name: st["removed"] for name, st, _ in stats["steps"]}
    # Records that are not pages (the sample's warcinfo record) are counted by type, not audited.
    by_type = {reason: n for reason, n in stats["steps"][0][1]["removed_by_reason"].items()
               if reason.startswith("record_type:")}
    with open(warc, "rb") as f:
        types = collections.Counter(rec.rec_type for rec in ArchiveIterator(f))
    assert by_type == {f"record_type:{t}": n for t, n in types.items() if t != "response"} != {}
    removed["warc_reader"] -= sum(by_type.values())
    audited = {name: sum(r["step"] == name for r in rows) for name in removed}
    assert audited == removed and sum(audited.values()) > 100
    reader_seen = stats["steps"][0][1]["seen"]
    assert reader_seen == sum(types.values())  # every record of the file
    assert reader_seen == stats["docs"] + len(rows) + sum(by_type.values())  # nothing unaccounted for
    assert audited["warc_reader"] > 0  # records the reader skips (not HTML, HTTP errors...) are audited too
    lang = [r for r in rows if r["reason"] == "lang_low_score"]
    assert lang and all(r["stat"] < r["limit"] == 0.65 for r in lang)
    # Every language drop names the language and its score, the wrong-language ones too.
    foreign = [r for r in rows if r["step"] == "langid" and r["reason"] != "lang_low_score"]
    assert len(foreign) >= 40 and all(r["reason"] == f"lang_{r['language']}" for r in foreign)
    assert all(0 < r["language_score"] <= 1 for r in foreign + lang)
    # C4 names the sentence count that fell short.
    c4 = [r for r in rows if r["reason"] == "c4_too_few_sentences"]
    assert c4 and all(r["stat"] < r["limit"] == 5 for r in c4)
    # A duplicate names the document kept in its place: one that is in the output.
    with gzip.open(stats["output"], "rt") as f:
        output = {d["id"]: d["url"] for d in map(json.loads, f)}
    dups = [r for r in rows if r["step"] in ("exact_dedup", "minhash_dedup")]
    assert len(dups) >= 10
    assert all(output[r["kept_id"]] == r["kept_url"] and r["kept_id"] != r["id"] for r in dups)
    with open(warc, "rb") as f:  # an offset is where the dropped record starts
        for r in [r for r in rows if r["url"]][:5]:
            f.seek(r["offset"])
            assert next(iter(ArchiveIterator(f))).rec_headers.get_header("WARC-Target-URI") == r["url"]
    with gzip.open(stats["output"], "rt") as f:
        kept_url = json.loads(f.readline())["url"]
    adult = next(r["url"] for r in rows if r["reason"] == "url_adult_word")
    def why(*args):
        return subprocess.run([sys.executable, "launch/why_dropped.py", str(out), *args], cwd=REPO,
                              capture_output=True, text=True)

    said = why(adult, kept_url)
    assert said.returncode == 0, said.stderr
    assert f"{adult}: dropped by url_filter: url_adult_word" in said.stdout and f"{kept_url}: kept" in said.stdout
    dup, other = dups[0], foreign[0]
    said = why(dup["url"], other["url"])
    assert f"duplicate of {dup['kept_url']} (id {dup['kept_id']})" in said.stdout, said.stdout
    assert f"{other['reason']}, language {other['language']} at {other['language_score']}" in said.stdout
    unseen = why("https://never.example/")
    assert unseen.returncode == 1 and "not seen by any audited task" in unseen.stdout


def test_global_dedup_across_tasks_keeps_exactly_the_earliest_copy(tmp_path):
    """Copies planted across three prepare_data tasks' files (each task dedups only its own
    file): the staged job, run as 2-task arrays, removes every copy but the earliest, exact
    and near (one changed word), and nothing else."""
    import subprocess
    import sys

    base = [f"Story {k}: " + " ".join(f"w{k}x{i}" for i in range(60)) + ". " + GOOD for k in range(6)]
    near = base[2].replace("w2x30", "changed")  # one word of ~130: Jaccard of 5-gram shingles ~0.93
    files = {  # file -> texts; dups of story 0 (exact) in files 1 and 2, of story 2 (near) in file 2
        0: [base[0], base[1], base[2]],
        1: [base[3], base[0], base[4]],
        2: [near, base[5], base[0]],
    }
    paths = []
    for f, texts in files.items():
        p = tmp_path / "in" / f"part{f}.jsonl"
        p.parent.mkdir(exist_ok=True)
        p.write_text("".join(json.dumps({"id": f"f{f}-{i}", "text": t, "url": f"https://e.example/{f}/{i}"}) + "\n"
                             for i, t in enumerate(texts)))
        paths.append(str(p))
    out = tmp_path / "prepared"
    for task in range(3):  # three array tasks: no task sees another's file
        assert run(out, paths, "--shard-index", str(task), "--num-shards", "3") == 0
    prepared = sum(json.load(open(d))["docs"] for d in glob.glob(str(out / "*.done")))
    assert prepared == 9  # the copies are all still there

    def dedup(*args):
        p = subprocess.run([sys.executable, "launch/dedup_global.py", "--input-dir", str(out), "--work-dir",
                            str(tmp_path / "work"), "--output-dir", str(tmp_path / "dedup"), *args],
                           cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    for stage in ("signatures", "buckets", "clusters", "filter"):
        for task in range(2):
            said = dedup("--stage", stage, "--task", str(task), "--tasks", "2")
    kept = JsonlReader(sorted(glob.glob(str(tmp_path / "dedup" / "*.jsonl.gz"))))
    urls = sorted(d.url for d in kept)
    assert urls == sorted(["https://e.example/0/0", "https://e.example/0/1", "https://e.example/0/2",
                           "https://e.example/1/0", "https://e.example/1/2", "https://e.example/2/1"])
    assert "stage filter done" in said
    # A rerun finds every stage done and changes nothing.
    dedup("--stage", "all")
    assert sorted(d.url for d in JsonlReader(sorted(glob.glob(str(tmp_path / "dedup" / "*.jsonl.gz"))))) == urls
    # The work directory belongs to these inputs: another input set is refused, not mixed in.
    (out / "web-00099-extra.jsonl.gz").write_bytes((out / os.path.basename(sorted(glob.glob(str(out / "*.jsonl.gz")))[0])).read_bytes())
    p = subprocess.run([sys.executable, "launch/dedup_global.py", "--input-dir", str(out), "--work-dir",
                        str(tmp_path / "work"), "--output-dir", str(tmp_path / "dedup")], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode != 0 and "made for other inputs" in p.stderr


def test_bad_data_config_fails_naming_the_key_before_any_file_is_read(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--output-dir", str(out), "data.words=nltk"])
    assert e.value.code == 2
    assert "data.words" in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)


def test_an_old_audit_and_old_stats_read_under_datatrove_reason_names(tmp_path):
    """Gopher's average-word-length reasons are named as datatrove names them now; audits and
    .done stats written under the old names read as the new ones."""
    import gzip

    from data_pipeline.audit import read_audits
    from data_pipeline.document import Document
    from data_pipeline.filters.quality import GopherQualityFilter
    from data_pipeline.step import StepStats

    path = tmp_path / "old.audit.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"url": "u", "step": "gopher_quality", "reason": "gopher_below_avg_word_length"}) + "\n")
    assert [r["reason"] for r in read_audits([str(path)])] == ["gopher_below_avg_threshold"]
    merged = StepStats()
    merged.merge({"removed": 3, "removed_by_reason": {"gopher_above_avg_word_length": 1,
                                                      "gopher_above_avg_threshold": 2}})
    assert dict(merged.removed_by_reason) == {"gopher_above_avg_threshold": 3}
    short_words = Document(id="s", text=" ".join(["the and ox"] * 30))
    assert GopherQualityFilter(min_stop_words=None).reject(short_words) == "gopher_below_avg_threshold"


def test_tokenized_outputs_answer_why_dropped_and_dedup_across_tasks(tmp_path, tokenizer_path):
    """--format tokens keeps each document's id and URL beside the shard: why_dropped finds
    kept pages there, and dedup_global compares the shards' decoded documents across tasks
    and writes back token shards (same tokenizer) without the later copies."""
    import subprocess
    import sys

    from data_pipeline.token_shards import TokenShards, read_token_shard
    from data_pipeline.tokenizer import Tokenizer

    def text(f, i):  # words of its own, so that no two documents are near duplicates
        return f"Document {f}.{i}: " + " ".join(f"w{f}x{i}y{k}" for k in range(60)) + ". " + GOOD

    paths = []
    for f in range(3):  # file 1 and 2 each hold a copy of file 0's first document, under another URL
        rows = [{"id": f"f{f}-{i}", "text": text(f, i), "url": f"https://t.example/{f}/{i}"} for i in range(3)]
        rows += [{"id": f"f{f}-short", "text": "too short", "url": f"https://t.example/{f}/short"}]
        if f:
            rows.append({"id": f"f{f}-copy", "text": text(0, 0), "url": f"https://t.example/{f}/copy"})
        p = tmp_path / "in" / f"part{f}.jsonl"
        p.parent.mkdir(exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(p))
    out = tmp_path / "tokens"
    for task in range(3):
        assert run(out, paths, "--shard-index", str(task), "--num-shards", "3", "--format", "tokens",
                   "--tokenizer", tokenizer_path, "--audit", "drops") == 0
    said = subprocess.run([sys.executable, "launch/why_dropped.py", str(out), "https://t.example/1/copy",
                           "https://t.example/2/short"], cwd=REPO, capture_output=True, text=True)
    assert said.returncode == 0, said.stdout + said.stderr
    assert "https://t.example/1/copy: kept" in said.stdout  # another task's file: not a duplicate there
    assert "https://t.example/2/short: dropped by gopher_quality: gopher_short_doc" in said.stdout
    p = subprocess.run([sys.executable, "launch/dedup_global.py", "--input-dir", str(out), "--work-dir",
                        str(tmp_path / "work"), "--output-dir", str(tmp_path / "dedup")],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    shards = TokenShards([str(tmp_path / "dedup")])
    kept = [r for path in shards.files for r in read_token_shard(path)]
    assert sorted(r["url"] for r in kept) == sorted(f"https://t.example/{f}/{i}" for f in range(3) for i in range(3))
    tok = Tokenizer(tokenizer_path)
    assert shards.tokenizer_digest == TokenShards([str(out)]).tokenizer_digest
    for r in kept:  # the kept documents' tokens are the ones prepare_data wrote, EOS included
        f, i = (int(x) for x in r["url"].rsplit("/", 2)[1:])
        assert r["ids"].tolist() == tok.encode(text(f, i), eos=True)


def test_the_task_runner_and_dedup_stages_are_library_code_any_executor_calls(tmp_path):
    """data_pipeline.runner and data_pipeline.global_dedup run without the launch scripts:
    three prepare tasks, then every dedup stage, called in-process as an executor would."""
    from data_pipeline import global_dedup, runner

    def text(f, i):  # words of its own, so that no two documents are near duplicates
        return f"Document {f}.{i}: " + " ".join(f"w{f}x{i}y{k}" for k in range(60)) + ". " + GOOD

    paths = []
    for f in range(3):  # files 1 and 2 each copy file 0's first document
        rows = [{"id": f"f{f}-good{i}", "text": text(f, i)} for i in range(4)]
        rows += [{"id": f"f{f}-dup", "text": text(0, 0)}] if f else []
        p = tmp_path / f"part{f}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(p))
    cfg = runner.load_data_cfg([*OVERRIDES, "data.sources.0.format=jsonl", f"data.sources.0.paths=[{','.join(paths)}]"])
    out = tmp_path / "prepared"
    out.mkdir()
    written = [o for t in range(3) for _, o, stats in runner.run_task(cfg, str(out), t, 3) if stats]
    assert len(written) == 3 and all(os.path.exists(o + ".done") for o in written)
    assert [stats for t in range(3) for *_, stats in runner.run_task(cfg, str(out), t, 3)] == [None] * 3  # done
    files = global_dedup.input_files(str(out))
    work, dedup = str(tmp_path / "work"), str(tmp_path / "dedup")
    global_dedup.check_inputs(work, files, cfg)
    for stage in global_dedup.STAGES:
        for task in range(2):
            summary = global_dedup.run_stage(stage, files, work, task, 2, cfg, dedup)
            if stage == "clusters" and task == 0:
                assert summary["removed"] == 2  # f1-dup and f2-dup copy f0-good0 across tasks
    ids = sorted(d.id for d in JsonlReader(sorted(glob.glob(os.path.join(dedup, "*.jsonl.gz")))))
    assert ids == sorted(f"f{f}-good{i}" for f in range(3) for i in range(4))
