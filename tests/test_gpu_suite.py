"""The GPU suite's machinery on the CPU (benchmarks/gpu_suite.py): the dry run's rows, timeouts
and expected total; a tiny end-to-end run through the real launchers (python, torchrun) with one
row that times out, one that fails and two that succeed; the suite's budget; and
benchmarks/gpu_checks.py needing nothing beyond kiln's install."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.py")


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


ROW_LINE = re.compile(r"^\s+(\d+)\s+(\S+)\s+(.*?)\s+(\d+)\s+(\d+)\s*$")
TOTAL_LINE = re.compile(r"expected total: (\d+) s \(([\d.]+) min\) = start-ups (\d+) s \+ rows (\d+) s .* "
                        r"\+ gpu_checks (\d+) s")


def dry_run(capsys, *args) -> tuple[list[tuple], re.Match, str]:
    suite = load_suite()
    assert suite.main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out
    rows = [(int(m[1]), m[2], m[3], int(m[4]), int(m[5])) for m in map(ROW_LINE.match, out.splitlines()) if m]
    total = TOTAL_LINE.search(out)
    assert total, out
    return rows, total, out


def test_dry_run_lists_every_row_with_its_timeout_and_the_expected_total(capsys, tmp_path):
    results = tmp_path / "results"
    rows, total, out = dry_run(capsys, "--results", str(results))
    names = [name for _, name, _, _, _ in rows]
    assert names == ["single-125m-s2048-eager", "single-125m-s2048-compile", "single-1b-s4096-eager",
                     "single-1b-s4096-compile", "single-1b-s4096-compile-ac", "fsdp-1b-s4096-compile",
                     "zero2-1b-s4096-compile", "zero3-1b-s4096-compile"]
    assert [i for i, *_ in rows] == list(range(1, 9))
    for _, name, _, est, timeout in rows:
        assert 0 < est <= timeout and timeout >= 60, (name, est, timeout)  # 3x the estimate, at least 60 s
    # the total is what the listing adds up to, and under the 10 minutes the suite promises
    starts = [int(s) for s in re.findall(r"start-up est (\d+) s", out)]
    assert len(starts) == 4 and int(total[3]) == sum(starts)
    assert abs(int(total[4]) - sum(est for *_, est, _ in rows)) <= len(rows)  # rounding of each row
    assert int(total[1]) == int(total[3]) + int(total[4]) + int(total[5]) or \
        abs(int(total[1]) - int(total[3]) - int(total[4]) - int(total[5])) <= 1
    assert int(total[5]) > 0 and "gpu_checks (benchmarks/gpu_checks.py)" in out
    assert int(total[1]) < 600 and "--budget 570 s" in out and "LESS than expected" not in out
    assert not results.exists()  # a dry run runs nothing and writes nothing


def test_dry_run_full_matrix_and_filters(capsys):
    rows, total, out = dry_run(capsys, "--full")
    names = {name for _, name, *_ in rows}
    assert len(rows) == 24 and len(names) == 24
    assert {f"single-{m}-s{s}-{v}" for m in ("125m", "1b") for s in (2048, 4096)
            for v in ("eager", "compile", "compile-ac")} <= names
    assert {f"{b}-{m}-s{s}-compile" for b in ("fsdp", "zero2", "zero3") for m in ("125m", "1b")
            for s in (2048, 4096)} <= names
    assert int(total[1]) > 570 and "LESS than expected" in out  # says the budget cuts it short
    rows, _, out = dry_run(capsys, "--cpu", "--tiny", "--backends", "single,fsdp", "--variants", "eager",
                           "--dist-variant", "eager", "--set", "fsdp-tiny-s32", "model.n_heads=3",
                           "--timeout", "s64", "7")
    assert [(name, extra) for _, name, extra, _, _ in rows] == [
        ("single-tiny-s32-eager", "-"), ("single-tiny-s64-eager", "-"),
        ("fsdp-tiny-s32-eager", "model.n_heads=3"), ("fsdp-tiny-s64-eager", "-")]
    assert [t for *_, t in rows] == [120, 7, 120, 7]
    assert "gpu_checks" not in out.split("expected total")[0]  # no CUDA checks on the CPU


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CPU run: single (python) and fsdp (torchrun), two lengths each. single s32 runs far
    past its 4 s timeout; fsdp s32 has a model its config refuses."""
    results = tmp_path_factory.mktemp("suite") / "results"
    cmd = [sys.executable, SUITE, "--cpu", "--tiny", "--backends", "single,fsdp", "--variants", "eager",
           "--dist-variant", "eager", "--results", str(results), "--dump-wait", "1",
           "--set", "single-tiny-s32", "bench.steps=1000000", "--timeout", "single-tiny-s32", "4",
           "--set", "fsdp-tiny-s32", "model.n_heads=3"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    data = json.loads((results / "results.json").read_text())
    return p, results, {r["name"]: r for r in data["rows"]}, (results / "table.md").read_text()


def table_row(table: str, name: str) -> list[str]:
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and f" {name} |" in ln]
    assert len(lines) == 1, (name, table)
    return [c.strip() for c in re.split(r"(?<!\\)\|", lines[0])[1:-1]]


COLUMNS = ["#", "row", "backend", "model", "seq", "micro", "compile", "AC", "status", "tokens/s", "ms/step", "MFU",
           "max allocated GiB", "max reserved GiB", "graphs / breaks", "loss", "warm-up s", "row s", "est s", "error"]


def test_tiny_cpu_run_gives_a_table_row_and_a_log_per_setting(tiny_run):
    p, results, rows, table = tiny_run
    assert p.returncode == 1, p.stdout + p.stderr  # a row failed and one timed out
    assert "expected total:" in p.stdout.split("process 01-single")[0]  # printed before anything runs
    assert table in p.stdout
    assert [r["status"] for r in rows.values()] == ["TIMEOUT", "ok", "FAILED", "ok"]
    for name in ("single-tiny-s64-eager", "fsdp-tiny-s64-eager"):
        cells = dict(zip(COLUMNS, table_row(table, name)))
        assert cells["status"] == "ok" and float(cells["tokens/s"].replace(",", "")) > 0
        assert 0 < float(cells["loss"]) < 20  # a real training step on random tokens: about ln(512)
        assert float(cells["ms/step"]) > 0 and cells["error"] == ""
        res = rows[name]["result"]
        assert res["world_size"] == 1 and res["device"] == "cpu" and res["max_rss_gib"] > 0
    assert rows["fsdp-tiny-s64-eager"]["result"]["graphs"] == 0  # eager: nothing compiled
    for r in rows.values():  # a full log per row, named after it, holding the row's own output
        assert os.path.basename(r["log"]) == f"{r['index']:02d}-{r['name']}.log"
        assert f"[gpu_suite] row {r['index']} {r['name']}: overrides" in open(r["log"]).read()
    ok_log = open(rows["fsdp-tiny-s64-eager"]["log"]).read()
    assert "backend=fsdp" in ok_log and '"tokens_per_s"' in ok_log
    # one process per backend, and a fresh one for the rows after a timeout
    procs = sorted(f for f in os.listdir(results / "logs") if f.startswith("proc") and f.endswith(".log"))
    assert procs == ["proc01-single.log", "proc02-single.log", "proc03-fsdp.log"]
    assert "torch.distributed.run" in open(results / "logs" / "proc03-fsdp.log").read().splitlines()[0]


def test_a_failing_row_shows_its_errors_last_lines_and_the_others_run(tiny_run):
    p, results, rows, table = tiny_run
    bad = rows["fsdp-tiny-s32-eager"]
    log = open(bad["log"]).read()
    assert "Traceback (most recent call last)" in log  # the whole traceback is kept
    last = [ln for ln in log.splitlines() if ln.strip()][-1]
    assert "config error: model.n_heads" in last
    cells = dict(zip(COLUMNS, table_row(table, "fsdp-tiny-s32-eager")))
    assert cells["status"] == "FAILED" and last.strip() in cells["error"].replace("\\|", "|")
    assert bad["error"][-1] == last.strip()
    # the log's tail is printed under the table too
    assert f"FAILED fsdp-tiny-s32-eager: the last lines of {bad['log']}" in table
    assert table.split(f"the last lines of {bad['log']}:")[1].count("Traceback (most recent call last)") == 1
    assert rows["fsdp-tiny-s64-eager"]["status"] == "ok"  # the next row of the same process ran


def test_a_row_past_its_timeout_is_killed_and_marked(tiny_run):
    p, results, rows, table = tiny_run
    slow = rows["single-tiny-s32-eager"]
    assert slow["status"] == "TIMEOUT" and slow["timeout_s"] == 4
    assert 4 <= slow["wall_s"] < 60, slow["wall_s"]
    cells = dict(zip(COLUMNS, table_row(table, "single-tiny-s32-eager")))
    assert cells["status"] == "TIMEOUT" and cells["error"].startswith("killed: timeout 4 s ⏎ stuck in: File ")
    log = open(slow["log"]).read()
    assert "[gpu_suite] TIMEOUT:" in log
    assert "most recent call first" in log.split("[gpu_suite] TIMEOUT:")[1]  # the worker's stacks, then killed
    assert "_run_row" in log.split("[gpu_suite] TIMEOUT:")[1]
    # every worker the suite started is gone (torchrun's runs in a session of its own)
    events = [json.loads(ln) for f in os.listdir(results / "logs") if f.endswith(".events.jsonl")
              for ln in open(results / "logs" / f)]
    pids = [ev["pid"] for ev in events if ev["ev"] == "pid"]
    assert len(pids) == 3
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
    assert rows["single-tiny-s64-eager"]["status"] == "ok"  # the next row ran, in a new process


def test_the_suite_stops_at_its_budget(tmp_path, capsys):
    results = tmp_path / "results"
    suite = load_suite()
    assert suite.main(["--cpu", "--tiny", "--backends", "single", "--variants", "eager", "--budget", "1",
                       "--results", str(results)]) == 1
    assert "SKIPPED" in capsys.readouterr().out
    rows = json.loads((results / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["SKIPPED", "SKIPPED"]
    assert all("suite budget of 1 s" in r["error"][0] for r in rows)


def test_gpu_checks_imports_without_pytest_or_the_tests():
    code = ("import sys, os; sys.modules['pytest'] = None; sys.modules['tests'] = None; "
            "os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None); "
            "import benchmarks.gpu_checks as g; "
            "print(sorted(m for m in sys.modules if m == 'tests' or m.startswith(('tests.', '_pytest')))); "
            "print(os.environ['CUBLAS_WORKSPACE_CONFIG']); "
            "print(g.compose(['model=tiny']).model.d_model)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:3] == ["['tests']", ":4096:8", "256"]  # only the blocked stub


def test_gpu_checks_resume_comparison_reports_where_losses_differ():
    spec = importlib.util.spec_from_file_location("gpu_checks_under_test",
                                                  os.path.join(REPO, "benchmarks", "gpu_checks.py"))
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)
    straight = {1: 6.9, 2: 6.5, 3: 6.1}
    assert g.compare_losses(straight, dict(straight)) == ""
    msg = g.compare_losses(straight, {1: 6.9, 2: 6.5, 3: 6.1 + 2e-7})
    assert "from step 3 on (1 of 3 steps)" in msg and "2.000e-07" in msg
    assert "steps differ" in g.compare_losses(straight, {1: 6.9, 2: 6.5})


def test_the_tp2_row_is_skipped_with_its_reason_where_fewer_than_two_gpus_are_visible(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible, whatever this host has
    rows, _, out = dry_run(capsys)
    assert "tp2-1b-s4096-compile" not in [name for _, name, *_ in rows]  # neither run nor counted in the total
    reason = f"tensor parallelism (backend.tp=2) needs 2 GPUs; this machine has {torch.cuda.device_count()}"
    assert f"skipped tp2-1b-s4096-compile: {reason}" in out
    suite = load_suite()
    results = tmp_path / "results"
    assert suite.main(["--backends", "tp2", "--no-checks", "--results", str(results)]) == 0  # skipped, not failed
    (row,) = json.loads((results / "results.json").read_text())["rows"]
    assert row["status"] == "SKIPPED" and row["error"] == [reason]
    assert not [f for f in os.listdir(results / "logs") if f.startswith("proc")]  # nothing was launched
