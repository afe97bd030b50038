"""Exact and MinHash dedup: what counts as a duplicate, bounded memory, checkpointable state;
global dedup across files accounts for every document it drops (its audit)."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
import torch

from data_pipeline.dedup import ExactDedup, MinHashDedup, MinHasher
from data_pipeline.document import Document


def d(text: str, i: int = 0) -> Document:
    return Document(id=str(i), text=text)


def kept(step, texts) -> list[int]:
    return [i for i, t in enumerate(texts) if step.run_one(d(t, i)) is not None]


def article(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    words = [f"w{rng.randrange(5000)}" for _ in range(n)]
    return " ".join(words)


def edit(text: str, changes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = f"changed{rng.randrange(10**6)}"
    return " ".join(words)


def roundtrip(state: dict) -> dict:
    """Through the trainer's JSON state file and through torch.load(weights_only=True)."""
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_exact_dedup_ignores_whitespace_but_not_content():
    s = ExactDedup()
    assert kept(s, ["a b  c", "a b c\n", "a b d"]) == [0, 2]
    assert s.stats.removed_by_reason["exact_duplicate"] == 1


def test_exact_dedup_fifo_eviction_forgets_the_oldest():
    s = ExactDedup(capacity=2)
    assert kept(s, ["A", "B", "C", "A", "C"]) == [0, 1, 2, 3]  # A was evicted by C; C still remembered
    s = ExactDedup(capacity=2, mode="global")  # global ignores the capacity
    assert kept(s, ["A", "B", "C", "A"]) == [0, 1, 2]


def test_exact_dedup_state_survives_a_checkpoint():
    s = ExactDedup(capacity=3)
    kept(s, ["A", "B", "C", "D"])
    t = ExactDedup(capacity=3)
    t.load_state_dict(roundtrip(s.state_dict()))
    # remembered at the save: B, C, D (A was evicted). B is a duplicate; A is new and evicts B; C is still known
    assert kept(t, ["B", "A", "C"]) == [1]
    assert kept(s, ["B", "A", "C"]) == [1]  # the uninterrupted index decides the same


def test_exact_dedup_forgets_at_a_new_epoch():
    s = ExactDedup()
    kept(s, ["A"])
    s.new_epoch()
    assert kept(s, ["A"]) == [0]


def test_minhash_defaults_are_finewebs():
    m = MinHashDedup()
    assert (m.hasher.ngram, m.hasher.num_bands, m.hasher.rows, m.hasher.num_hashes) == (5, 14, 8, 112)


def test_minhash_drops_near_duplicates_and_keeps_distinct_documents():
    base = article(1)
    texts = [base, edit(base, 3, seed=1), article(2), edit(base, 5, seed=2).upper(), article(3)]
    assert kept(MinHashDedup(), texts) == [0, 2, 4]


def test_minhash_keeps_documents_that_share_only_half_their_shingles():
    base = article(1, 400)
    words = base.split()
    half = " ".join(words[:200] + article(9, 200).split())  # Jaccard of 5-gram sets ~ 1/3
    assert kept(MinHashDedup(), [base, half]) == [0, 1]


def test_minhash_threshold_verifies_band_collisions():
    base = article(4)
    near = edit(base, 10, seed=3)  # about 85% of the shingles survive 10 edits
    sig_a, sig_b = MinHasher().signature(base), MinHasher().signature(near)
    est = float(np.mean(sig_a == sig_b))
    assert 0.6 < est < 0.95
    assert kept(MinHashDedup(threshold=0.0), [base, near]) == [0]
    assert kept(MinHashDedup(threshold=est), [base, near]) == [0]
    assert kept(MinHashDedup(threshold=min(1.0, est + 0.05)), [base, near]) == [0, 1]


def test_minhash_signatures_are_deterministic_across_instances():
    a, b = MinHasher(seed=1).signature(article(5)), MinHasher(seed=1).signature(article(5))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, MinHasher(seed=2).signature(article(5)))


def test_minhash_capacity_bounds_memory_with_fifo_eviction():
    m = MinHashDedup(capacity=2)
    texts = [article(10), article(11), article(12), edit(article(10), 2), edit(article(12), 2)]
    assert kept(m, texts) == [0, 1, 2, 3]  # 10 was evicted, 12 is still remembered
    assert len(m.docs) == 2 and m.evicted == 2
    assert len(m.buckets) <= 2 * 14


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_minhash_state_survives_a_checkpoint(threshold):
    m = MinHashDedup(capacity=3, threshold=threshold)
    kept(m, [article(20), article(21), article(22), article(23)])
    state = roundtrip(m.state_dict())
    assert state["n"] == 3 and len(state["band_keys"]) < 3 * 14 * 8 * 2  # packed int64, base64
    r = MinHashDedup(capacity=3, threshold=threshold)
    r.load_state_dict(state)
    later = [edit(article(20), 2), edit(article(22), 2), article(24)]
    assert kept(r, later) == [0, 2]
    assert kept(m, later) == [0, 2]  # the same decision as the uninterrupted index


def test_minhash_empty_text_is_passed_through():
    assert kept(MinHashDedup(), ["", ""]) == [0, 1]


# Global dedup (data_pipeline/global_dedup.py) across files: its filter stage's audit.

def story(k: int) -> str:
    return f"Story {k}: " + " ".join(f"w{k}x{i}" for i in range(80)) + "."


NEAR2 = story(2).replace("w2x40", "changed")  # one word of 82: Jaccard of 5-gram shingles ~0.9
# file -> (id, text); the document kept for a copy's cluster is its earliest, which may be in another file
GLOBAL_FILES = {
    0: [("a0", story(0)), ("a1", story(1)), ("a2", story(2))],
    1: [("b0", story(3)), ("b1", story(0)), ("b2", story(4)), ("b3", NEAR2)],
    2: [("c0", story(0)), ("c1", story(5)), ("c2", story(3)), ("c3", NEAR2)],
}
# dropped id -> (reason, id kept for its cluster): c3 is an exact copy of b3, but b3 is itself
# removed and the cluster's kept document a2 is only a near duplicate of it
GLOBAL_DROPS = {"b1": ("exact_duplicate", "a0"), "b3": ("near_duplicate", "a2"), "c0": ("exact_duplicate", "a0"),
                "c2": ("exact_duplicate", "b0"), "c3": ("near_duplicate", "a2")}


def _url(doc_id: str) -> str:
    return f"https://g.example/{doc_id}"


def _global_inputs(directory, fmt: str, tokenizer=None) -> None:
    import gzip

    from data_pipeline.runner import write_done
    from data_pipeline.token_shards import install_tokenizer, write_token_shard

    directory.mkdir()
    for f, docs in GLOBAL_FILES.items():
        if fmt == "tokens":
            prefix = str(directory / f"part{f}")
            counts = write_token_shard([Document(id=i, text=t, url=_url(i)) for i, t in docs], tokenizer, prefix)
            write_done(prefix + ".bin", counts)
        else:
            with gzip.open(directory / f"part{f}.jsonl.gz", "wt") as out:
                out.writelines(json.dumps({"id": i, "text": t, "url": _url(i)}) + "\n" for i, t in docs)
    if fmt == "tokens":
        install_tokenizer(tokenizer.path, str(directory))


def _run_global(src, work: str, dedup, tasks: int) -> list[str]:
    from data_pipeline import global_dedup
    from data_pipeline.runner import load_data_cfg

    cfg = load_data_cfg([])
    files = global_dedup.input_files(str(src))
    global_dedup.check_inputs(work, files, cfg)
    for stage in global_dedup.STAGES:
        for task in range(tasks):
            global_dedup.run_stage(stage, files, work, task, tasks, cfg, str(dedup))
    return files


@pytest.mark.parametrize("fmt", ["jsonl", "tokens"])
def test_global_dedup_audits_every_drop_with_the_document_kept_for_its_cluster(tmp_path, fmt, request):
    """Every document the filter stage drops is in the audit beside its output exactly once,
    naming the document kept for its duplicate cluster (in another file; its id and URL as
    the signatures stage recorded them from that file's docs or a token shard's ids and URLs);
    kept plus audited is every input document; why_dropped on the output directory names the
    kept document; the audits are not taken for inputs."""
    import collections
    import subprocess
    import sys

    from data_pipeline import global_dedup
    from data_pipeline.audit import kept_documents, output_files, read_audits
    from data_pipeline.runner import read_done

    tokenizer = request.getfixturevalue("tokenizer") if fmt == "tokens" else None
    src, dedup = tmp_path / "prepared", tmp_path / "dedup"
    _global_inputs(src, fmt, tokenizer)
    files = _run_global(src, str(tmp_path / "work"), dedup, tasks=2)
    assert len(files) == 3

    outputs = output_files(str(dedup))
    assert [os.path.basename(p) for p in outputs] == [os.path.basename(p) for p in files]
    assert global_dedup.input_files(str(dedup)) == outputs  # the audits beside them are not inputs
    file_of = {i: files[f] for f, docs in GLOBAL_FILES.items() for i, _ in docs}
    audited = []
    for f, out in enumerate(outputs):
        done = read_done(out)
        rows = list(read_audits([done["audit"]["path"]]))
        assert done["audit"]["path"] == out + ".audit.jsonl.gz"
        assert len(rows) == done["removed_as_duplicates"] == done["audit"]["lines"]
        kept = [d["id"] for d in kept_documents(str(dedup)) if file_of[d["id"]] == files[f]]
        assert len(kept) == done["docs"]
        assert sorted(kept + [r["id"] for r in rows]) == sorted(i for i, _ in GLOBAL_FILES[f])
        for r in rows:
            assert r["step"] == "global_dedup" and r["file"] == files[f] and r["url"] == _url(r["id"])
            assert [i for i, _ in GLOBAL_FILES[f]][r["offset"]] == r["id"]
        audited += rows
    assert collections.Counter(r["id"] for r in audited) == collections.Counter(list(GLOBAL_DROPS))  # each once
    for r in audited:
        reason, survivor = GLOBAL_DROPS[r["id"]]
        assert (r["reason"], r["kept_id"], r["kept_url"], r["kept_file"]) == (reason, survivor, _url(survivor),
                                                                            file_of[survivor])
        assert r["kept_file"] != r["file"]
    kept_ids = {d["id"] for d in kept_documents(str(dedup))}
    assert kept_ids == {i for docs in GLOBAL_FILES.values() for i, _ in docs} - set(GLOBAL_DROPS)

    said = subprocess.run([sys.executable, "launch/why_dropped.py", str(dedup), _url("c3"), _url("a2")],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True)
    assert said.returncode == 0, said.stdout + said.stderr
    assert (f"{_url('c3')}: dropped by global_dedup: near_duplicate, the document kept for its duplicate cluster "
            f"is {_url('a2')} (id a2 in {files[0]}) ({files[2]} at 3)") in said.stdout
    assert f"{_url('a2')}: kept" in said.stdout


def _read_all(paths) -> list[bytes]:
    return [open(p, "rb").read() for p in paths]


@pytest.mark.parametrize("fmt", ["jsonl", "tokens"])
def test_global_dedup_filter_reads_no_other_input_file(tmp_path, fmt, request):
    """The filter stage takes the kept documents' ids and URLs from the signatures stage's
    records, not from their input files: with every other input file moved away (documents,
    token shards and the ids and URLs beside them), each file is filtered into the outputs
    and audits of a run that had every input in place."""
    from data_pipeline import global_dedup
    from data_pipeline.audit import kept_documents, read_audits
    from data_pipeline.runner import load_data_cfg

    tokenizer = request.getfixturevalue("tokenizer") if fmt == "tokens" else None
    src, away, ref, dedup = tmp_path / "prepared", tmp_path / "away", tmp_path / "ref", tmp_path / "dedup"
    _global_inputs(src, fmt, tokenizer)
    files = _run_global(src, str(tmp_path / "work_ref"), ref, tasks=1)
    work, cfg = str(tmp_path / "work"), load_data_cfg([])
    global_dedup.check_inputs(work, files, cfg)
    for stage in ("signatures", "buckets", "clusters"):
        global_dedup.run_stage(stage, files, work, 0, 1, cfg)
    away.mkdir()
    for i, path in enumerate(files):
        others = [p for p in src.iterdir() if p.name.startswith("part") and not p.name.startswith(f"part{i}.")]
        assert len(others) == (2 if fmt == "jsonl" else 8)
        for p in others:
            p.rename(away / p.name)
        try:  # task i of len(files) filters file i only
            global_dedup.run_stage("filter", files, work, i, len(files), cfg, str(dedup))
        finally:
            for p in others:
                (away / p.name).rename(p)
        name = os.path.basename(path)
        audit = list(read_audits([str(dedup / name) + ".audit.jsonl.gz"]))
        assert audit == list(read_audits([str(ref / name) + ".audit.jsonl.gz"]))
        assert [r["id"] for r in audit] == [doc_id for doc_id, _ in GLOBAL_FILES[i] if doc_id in GLOBAL_DROPS]
        assert all(r["kept_file"] != path for r in audit)  # each one looked up in another file
    assert len(list(dedup.glob("*.audit.jsonl.gz"))) == 3
    assert list(kept_documents(str(dedup))) == list(kept_documents(str(ref)))


def test_global_dedup_rerun_keeps_finished_audits_and_reclusters_a_work_dir_without_survivors(tmp_path):
    """A rerun skips finished files (their audits untouched); a work directory clustered
    before survivors were recorded is clustered again, so a redone file gets its audit, and
    one signed before ids and URLs were recorded gets them (by the signatures stage, or by the
    filter stage when only it is rerun), with the same audit."""
    import glob

    from data_pipeline import global_dedup
    from data_pipeline.audit import read_audits
    from data_pipeline.runner import load_data_cfg

    src, work, dedup = tmp_path / "prepared", str(tmp_path / "work"), tmp_path / "dedup"
    _global_inputs(src, "jsonl")
    _run_global(src, work, dedup, tasks=1)
    audits = sorted(glob.glob(str(dedup / "*.audit.jsonl.gz")))
    assert len(audits) == 3
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in audits}
    survivors = sorted(glob.glob(os.path.join(work, "remove", "*.survivors.npz")))
    records = sorted(glob.glob(os.path.join(work, "ids", "*.npy")))
    assert len(survivors) == 3 and len(records) == 6
    recorded = _read_all(records)
    expected = list(read_audits([audits[2]]))
    assert [(r["id"], r["kept_id"]) for r in expected] == [("c0", "a0"), ("c2", "b0"), ("c3", "a2")]
    for p in survivors + records:  # as an older version left the work directory
        os.remove(p)
    os.remove(audits[2])
    os.remove(str(dedup / "part2.jsonl.gz.done"))
    files = _run_global(src, work, dedup, tasks=1)
    assert sorted(glob.glob(os.path.join(work, "remove", "*.survivors.npz"))) == survivors
    assert sorted(glob.glob(os.path.join(work, "ids", "*.npy"))) == records and _read_all(records) == recorded
    after = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in audits}
    assert {p: after[p] for p in audits[:2]} == {p: before[p] for p in audits[:2]}  # skipped
    assert list(read_audits([audits[2]])) == expected

    for p in records:  # the filter stage alone records the ids and URLs it needs
        os.remove(p)
    os.remove(audits[2])
    os.remove(str(dedup / "part2.jsonl.gz.done"))
    global_dedup.run_stage("filter", files, work, 0, 1, load_data_cfg([]), str(dedup))
    assert list(read_audits([audits[2]])) == expected
    # files 0 and 1 hold the documents kept for c0, c2 and c3: only theirs are recorded again
    assert [os.path.exists(p) for p in records] == [True] * 4 + [False] * 2
