"""The sbatch scripts under slurm/ on a real Slurm: a one-node cluster on localhost started
by slurm/local/up.sh (which apt-installs slurmctld, slurmd and munge when missing).

Jobs are submitted with sbatch exactly as a user would; nothing of Slurm is mocked:
  * a 2-process CPU pretraining job (srun -> torchrun, DDP) runs to the end and checkpoints;
  * the same job, sent SIGUSR1 mid-run (`scancel --batch --signal=USR1`, what
    `#SBATCH --signal=B:USR1@N` does near the time limit), checkpoints after the current
    step, requeues itself and, as restart 1, resumes to the same per-step losses;
  * the srun launcher (Slurm starts every rank, FSDP) and the DeepSpeed launcher (hostfile,
    one launcher per node, ZeRO-1) start the same training;
  * a 3-task data-preparation array job over 3 WARC shards writes outputs and stats, and a
    rerun of the array skips them.

The Slurm daemons are started once per session and stopped at the end. If Slurm cannot be
installed or started the tests fail; set KILN_SKIP_SLURM=1 to skip them explicitly.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.conftest import REPO, SAMPLE_WARC
from tests.ports import free_port

SLURM_DIR = os.path.join(REPO, "slurm")
TOL = 1e-4  # across backends (see tests/test_distributed.py); a resumed run must match exactly
STEPS = 120  # long enough to be signalled mid-run (~60 ms a step here), short enough to be cheap
TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
    "data.seq_len=32", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.eval_every=40",
    "train.eval_sequences=8", "train.log_every=1", "train.sample_tokens=0", "logger.plot=false", f"train.max_steps={STEPS}",
    "checkpoint.every=1000", "optim.warmup_steps=2", "optim.lr=3e-3",
]



class Cluster:
    def __init__(self, env: dict, workdir):
        self.env = env
        self.workdir = workdir  # sbatch runs here: job logs and stop files land here

    def run(self, *cmd, check=True, timeout=60) -> str:
        p = subprocess.run(list(cmd), env=self.env, cwd=self.workdir, capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert p.returncode == 0, f"{' '.join(cmd)}: {p.stdout}{p.stderr}"
        return p.stdout

    def sbatch(self, script: str, args, flags=(), **env) -> str:
        cmd = ["sbatch", "--parsable", *flags, os.path.join(SLURM_DIR, script), *args]
        p = subprocess.run(cmd, env={**self.env, **env}, cwd=self.workdir, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, f"{' '.join(cmd)}: {p.stdout}{p.stderr}"
        return p.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job` of a job (one dict per array task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def in_queue(self, job_id: str) -> bool:
        return bool(self.run("squeue", "-h", "-j", job_id, "-o", "%i", check=False).strip())

    def wait(self, job_id: str, timeout: float = 300) -> list[dict]:
        """Poll squeue (faster than sbatch --wait) until the job left the queue."""
        deadline = time.time() + timeout
        while self.in_queue(job_id):
            if time.time() > deadline:
                state = self.run("scontrol", "show", "job", job_id, check=False) + self.run("sinfo", check=False)
                self.run("scancel", job_id, check=False)
                pytest.fail(f"job {job_id} still queued after {timeout}s:\n{state}\n{self.logs()}")
            time.sleep(0.3)
        return self.jobs(job_id)

    def logs(self) -> str:
        """The tails of the job logs and of the daemons' logs, for failure messages."""
        paths = sorted(glob.glob(str(self.workdir / "*.out")))
        paths += sorted(glob.glob(os.path.join(self.env["SLURM_LOCAL_DIR"], "log", "*.log")))
        return "\n".join(f"== {p}\n{open(p, errors='replace').read()[-3000:]}" for p in paths)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.environ.get("KILN_SKIP_SLURM") == "1":
        pytest.skip("KILN_SKIP_SLURM=1: Slurm tests skipped on request")
    # munged wants every directory above its socket to be o+x, which pytest's tmp dirs are not
    state = pathlib.Path(tempfile.mkdtemp(prefix="kiln-slurm-"))
    state.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KILN_"))}
    env.update(SLURM_LOCAL_DIR=str(state), SLURM_CONF=str(state / "slurm.conf"),
               SLURM_LOCAL_CTLD_PORT=free_port(), SLURM_LOCAL_SLURMD_PORT=free_port(),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    up = subprocess.run(["bash", os.path.join(SLURM_DIR, "local", "up.sh")], env=env, capture_output=True,
                        text=True, timeout=1200)
    if up.returncode != 0:
        subprocess.run(["bash", os.path.join(SLURM_DIR, "local", "down.sh")], env=env, capture_output=True,
                       timeout=120)
        pytest.fail("could not install/start a local Slurm with slurm/local/up.sh (set KILN_SKIP_SLURM=1 to skip "
                    f"the Slurm tests explicitly):\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
    workdir = tmp_path_factory.mktemp("slurm-jobs")
    try:
        yield Cluster(env, workdir)
    finally:
        subprocess.run(["bash", os.path.join(SLURM_DIR, "local", "down.sh")], env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def losses(run_dir) -> dict[int, list[float]]:
    """Train loss per step, every time the step was logged."""
    out: dict[int, list[float]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "train":
                out.setdefault(r["step"], []).append(r["loss"])
    return out


def log_of(slurm: Cluster, job_id: str, name: str = "kiln-pretrain") -> str:
    with open(slurm.workdir / f"{name}-{job_id}.out") as f:
        return f.read()


def complete_checkpoints(run_dir) -> list[str]:
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(str(run_dir / "checkpoints/step_*/meta.json")))


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, tokenizer_path):
    """The uninterrupted 2-process job: the reference every other pretraining job must match."""
    run_dir = tmp_path_factory.mktemp("slurm-runs") / "reference"
    t0 = time.time()
    # No backend key, as in the README's first sbatch line: backend=auto must follow torchrun.
    job = slurm.sbatch("pretrain.sbatch", TINY + [f"tokenizer.path={tokenizer_path}",
                                                  f"run_dir={run_dir}"], KILN_NPROC_PER_NODE="2")
    info = slurm.wait(job)
    return {"job": job, "info": info[0], "run_dir": run_dir, "seconds": time.time() - t0,
            "tokenizer": tokenizer_path}


def test_two_process_pretraining_job_runs_to_the_end_and_checkpoints(slurm, reference):
    info, run_dir = reference["info"], reference["run_dir"]
    log = log_of(slurm, reference["job"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "launcher=torchrun nproc_per_node=2" in log and "restart 0" in log
    assert "backend=ddp (auto: torchrun started 2 processes" in log and "world_size=2" in log
    assert complete_checkpoints(run_dir) == [f"step_{STEPS:08d}"]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values())
    assert got[STEPS][0] < got[1][0] - 1.0  # it learned
    assert not glob.glob(str(slurm.workdir / ".kiln-stop.*"))


def test_usr1_checkpoints_requeues_and_the_rerun_resumes_to_the_same_losses(slurm, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    job = slurm.sbatch("pretrain.sbatch", TINY + [f"tokenizer.path={reference['tokenizer']}",
                                                  f"run_dir={run_dir}"], KILN_NPROC_PER_NODE="2")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):  # two steps done
        assert slurm.in_queue(job) and time.time() < deadline, f"job ended before step 2:\n{slurm.logs()}"
        time.sleep(0.1)
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@N sends
    while True:  # requeued: pending again, restart count 1; release the requeue hold
        info = slurm.jobs(job)[0]
        if int(info["Restarts"]) >= 1 and info["JobState"] != "REQUEUED":
            break
        assert time.time() < deadline, f"not requeued: {info}\n{slurm.logs()}"
        time.sleep(0.2)
    # Slurm holds a requeued job ~120 s by default (~14 s with this cluster's cred_expire=10) so
    # that its revoked launch credential expires first; releasing it earlier than ~1 s after the
    # requeue fails the relaunch ("Job credential revoked"). Wait that out, then start it now.
    time.sleep(3)
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)  # fails if already running
    info = slurm.wait(job)[0]
    log = log_of(slurm, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", \
        f"{info}\n{slurm.logs()}"

    # the first run: USR1 -> stop file -> every rank stopped after the same step, checkpointed, requeued
    stopped = int(re.search(r"stop requested: checkpointed at step (\d+)", log).group(1))
    assert 2 <= stopped < STEPS, log
    assert "SIGUSR1: asking training to checkpoint" in log and "requeueing job" in log
    # the rerun (SLURM_RESTART_COUNT=1) resumed from that checkpoint, in the same run directory and log
    assert re.search(rf"job {job} restart 1:", log), log
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in log
    assert complete_checkpoints(run_dir) == [f"step_{stopped:08d}", f"step_{STEPS:08d}"]
    # every step ran exactly once, with the very losses of the uninterrupted job
    got, want = losses(run_dir), losses(reference["run_dir"])
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values())
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}
    assert not os.path.exists(slurm.workdir / f".kiln-stop.{job}")


@pytest.mark.parametrize("launcher,flags,backend", [
    ("srun", ["--ntasks-per-node=2"], ["backend=fsdp"]),
    ("deepspeed", [], ["backend=deepspeed", "backend.zero_stage=1"]),
])
def test_srun_and_deepspeed_launchers_train_the_same_steps(slurm, reference, tmp_path, launcher, flags, backend):
    run_dir = tmp_path / launcher
    stop = 4  # the first steps of the same schedule, then checkpoint and exit
    args = TINY + backend + [f"tokenizer.path={reference['tokenizer']}", f"run_dir={run_dir}",
                             f"train.stop_at_step={stop}"]
    job = slurm.sbatch("pretrain.sbatch", args, flags, KILN_LAUNCHER=launcher,
                       **({} if launcher == "srun" else {"KILN_NPROC_PER_NODE": "2"}))
    info = slurm.wait(job)[0]
    log = log_of(slurm, job)
    assert info["JobState"] == "COMPLETED", log
    assert f"launcher={launcher} nproc_per_node=2" in log and "world_size=2" in log
    assert complete_checkpoints(run_dir) == [f"step_{stop:08d}"]
    got, want = losses(run_dir), losses(reference["run_dir"])
    assert sorted(got) == list(range(1, stop + 1))
    for s in got:
        assert abs(got[s][0] - want[s][0]) <= TOL, (s, got, want)


def make_warc_shards(directory, n_shards=3, records_per_shard=10) -> list[str]:
    """Split the first response records of the bundled WARC into small WARC shards."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"crawl{i}.warc.gz") for i in range(n_shards)]
    files = [open(p, "wb") for p in paths]
    writers = [WARCWriter(f, gzip=True) for f in files]
    n = 0
    with open(SAMPLE_WARC, "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response":
                writers[n % n_shards].write_record(rec)
                n += 1
                if n == n_shards * records_per_shard:
                    break
    for f in files:
        f.close()
    return paths


def test_prepare_data_array_job_writes_every_shard_and_a_rerun_skips_them(slurm, tmp_path):
    shards = make_warc_shards(tmp_path / "crawl")
    out = tmp_path / "prepared"
    args = ["--output-dir", str(out), "--input", *shards, "--input-format", "warc"]
    job = slurm.sbatch("prepare_data.sbatch", args, ["--array=0-2"])
    tasks = slurm.wait(job)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"]
    assert all(t["JobState"] == "COMPLETED" for t in tasks), slurm.logs()
    outputs = sorted(glob.glob(str(out / "*.jsonl.gz")))
    assert [os.path.basename(p) for p in outputs] == [f"web-{i:05d}-crawl{i}.jsonl.gz" for i in range(3)]
    total = 0
    for i, path in enumerate(outputs):
        with open(path + ".done") as f:
            stats = json.load(f)
        steps = {name: st for name, st, _ in stats["steps"]}
        assert steps["warc_reader"]["seen"] == 10 and "langid" in steps  # the full default chain ran
        with gzip.open(path, "rt") as f:
            assert sum(1 for _ in f) == stats["docs"]
        total += stats["docs"]
        log = open(slurm.workdir / f"kiln-prepare-{job}_{i}.out").read()
        assert f"array task {i} of 3" in log and f"task {i}/3: 1 files written, 0 already done" in log
    assert total > 0
    mtimes = [os.path.getmtime(p) for p in outputs]

    rerun = slurm.sbatch("prepare_data.sbatch", args, ["--array=0-2"])
    report = slurm.sbatch("prepare_data.sbatch", ["--output-dir", str(out), "--summarize"],
                          [f"--dependency=afterok:{rerun}"])
    assert all(t["JobState"] == "COMPLETED" for t in slurm.wait(rerun)), slurm.logs()
    for i in range(3):
        log = open(slurm.workdir / f"kiln-prepare-{rerun}_{i}.out").read()
        assert f"task {i}/3: 0 files written, 1 already done" in log, log
    assert [os.path.getmtime(p) for p in outputs] == mtimes
    assert slurm.wait(report)[0]["JobState"] == "COMPLETED", slurm.logs()
    assert os.listdir(out / "report")

    # Cross-task dedup, each stage an array job chained by dependencies: a fourth output that
    # copies the first one's documents goes entirely, the originals stay.
    import shutil

    shutil.copyfile(outputs[0], out / "web-00003-copy.jsonl.gz")
    common = ["--input-dir", str(out), "--work-dir", str(tmp_path / "work")]
    jobs = []
    for stage, array in (("signatures", "--array=0-1"), ("buckets", "--array=0-1"), ("clusters", None),
                         ("filter", "--array=0-1")):
        flags = ([array] if array else []) + ([f"--dependency=afterok:{jobs[-1]}"] if jobs else [])
        extra = ["--output-dir", str(tmp_path / "dedup")] if stage == "filter" else []
        jobs.append(slurm.sbatch("dedup_global.sbatch", ["--stage", stage, *common, *extra], flags))
    for job in jobs:
        assert all(t["JobState"] == "COMPLETED" for t in slurm.wait(job)), slurm.logs()
    with open(tmp_path / "dedup" / "web-00003-copy.jsonl.gz.done") as f:
        copy_stats = json.load(f)
    with open(outputs[0] + ".done") as f:
        first_docs = json.load(f)["docs"]
    assert copy_stats["docs"] == 0 and copy_stats["removed_as_duplicates"] == first_docs > 0
    from data_pipeline.audit import AUDIT_SUFFIX
    from data_pipeline.readers.base import expand_paths

    texts = []
    for path in expand_paths(str(tmp_path / "dedup" / "*.jsonl.gz")):  # the outputs, not their audits
        with gzip.open(path, "rt") as f:
            texts += [json.loads(line)["text"] for line in f]
    assert len(texts) == len(set(texts)) and len(texts) >= first_docs  # one copy of each, the originals kept
    # every dropped copy is audited beside its output, naming the original it duplicates
    with gzip.open(tmp_path / "dedup" / f"web-00003-copy.jsonl.gz{AUDIT_SUFFIX}", "rt") as f:
        drops = [json.loads(line) for line in f]
    assert len(drops) == first_docs and {d["reason"] for d in drops} == {"exact_duplicate"}
    assert {os.path.basename(d["kept_file"]) for d in drops} == {os.path.basename(outputs[0])}


SCRIPTS = sorted(glob.glob(os.path.join(SLURM_DIR, "*.sbatch")) + glob.glob(os.path.join(SLURM_DIR, "*.sh"))
                 + glob.glob(os.path.join(SLURM_DIR, "local", "*.sh"))
                 + glob.glob(os.path.join(REPO, "benchmarks", "*.sh")) + glob.glob(os.path.join(REPO, "scripts", "*.sh")))


def test_scripts_parse():
    assert len(SCRIPTS) >= 6
    for s in SCRIPTS:
        p = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert p.returncode == 0, f"{s}: {p.stderr}"


def test_scripts_pass_shellcheck():
    if subprocess.run(["bash", "-c", "command -v shellcheck"], capture_output=True).returncode != 0:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    p = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
