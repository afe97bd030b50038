"""The GPU suite: kiln's training step timed per backend and setting on one H100/H200, in
one table, in under 10 minutes; then the CUDA-only checks (benchmarks/gpu_checks.py).

    python benchmarks/gpu_suite.py 2>&1 | tee gpu_suite.log     # the suite (about 7 min)
    python benchmarks/gpu_suite.py --dry-run                    # rows, timeouts, expected total
    python benchmarks/gpu_suite.py --full                       # every backend at every shape (longer)
    python benchmarks/gpu_suite.py --cpu --tiny --variants eager --dist-variant eager  # the machinery, on a CPU

Rows. Each row is one setting: backend (single, fsdp, zero2, zero3), model (125m, 1b), sequence
length (2048 with micro-batch 8, 4096 with micro-batch 4: 16,384 tokens a step either way) and
variant (eager; compile; compile + activation checkpointing). The default set, 8 rows, is what
fits the budget and answers the questions of a first run: every variant at the target shape
(1b, seq 4096: what compile gains, what activation checkpointing costs), 125m eager and
compiled at its own length 2048, and each distributed backend compiled at the target shape
(FSDP and ZeRO on one GPU: do they run, and what do they cost against single). ``--full`` runs
every backend x model x length (x variant for single): 24 rows, about 13 minutes (raise
``--budget``). The ``tp2`` row (FSDP with ``backend.tp=2``, torchrun with 2 processes, one per
GPU) runs where 2 GPUs are visible; elsewhere it is listed as SKIPPED with the reason, is not
in the expected total and does not fail the suite (``--cpu`` runs it as 2 gloo processes).

How it runs. One process per backend (python for single; torchrun for fsdp; the DeepSpeed
launcher for zero2/zero3; ``--launcher env`` sets the variables those launchers set and runs a
plain python instead). Inside it, the rows run one after the other through the trainer itself
(``Trainer``: model built, activation checkpointing and compile applied, backend set up, then
``Trainer.forward_backward`` + ``backend.step``) on random tokens, like benchmarks/bench_train.py.
Rows that differ only in sequence length and micro-batch share one trainer: the model is built
and set up once and each shape is timed on it (compiled: static shapes, a recompile per shape;
automatic dynamic shapes are off so the second shape is not timed with dynamic kernels). Per
row: ``--warmup`` steps (compile happens here), then ``--steps`` timed steps; tokens/s, ms/step,
MFU, ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the timed steps (the
difference is the caching allocator's slack and fragmentation), the compiled graphs and graph
breaks the row added (torch._dynamo counters) and the last step's loss.

Timeouts and failures. Every row has a timeout (listed by ``--dry-run``), as has each
process's start-up; a row past its timeout gets its Python stacks written into its log
(faulthandler), is killed with its process, and is marked TIMEOUT; the backend's remaining rows
continue in a fresh process. A row that raises is marked FAILED; its traceback stays whole in
its log, and its last lines are shown in the table and the log's tail below it. A config
error only fails its row; any other error ends the process (its CUDA or process-group state is
not trusted) and the remaining rows continue in a new one. The whole suite stops at
``--budget`` seconds (default 570, inside the 10 minutes): a row still running then is
killed, the rows not started are marked SKIPPED. Every row's full output is kept in
``<results>/logs/`` (NN-<row>.log), each process's own output beside it, the table in
``<results>/table.md`` and the numbers in ``<results>/results.json``.

The expected total, printed before anything runs, is the sum over processes of

    start-up                          10 s for python (interpreter, torch, Hydra, CUDA context);
                                      torchrun +5 s, the DeepSpeed launcher +10 s (two more
                                      interpreters importing torch, one DeepSpeed)
  + per row                           3 s (batches, cleanup, logging)
  + per trainer built                 2 s + 3 s per billion parameters (the model is built on
                                      the meta device and initialised on the GPU, or shard by
                                      shard under FSDP and ZeRO-3; then the backend's set-up and
                                      the optimizer)
  + compile                           45 s for the first compiled trainer of a process (cold
                                      Inductor and Triton caches; the compile workers start), 30 s
                                      for each further compiled trainer, 20 s for each further
                                      shape of a trainer (a static recompile), 15 s for graphs an
                                      earlier process compiled (same shapes, recomputation and
                                      parameter dtype, so assumed found in Inductor's on-disk
                                      caches; FSDP and ZeRO both run the blocks on bf16 parameters)
  + steps                             (warmup + steps) x FLOPs per step / (989 TFLOP/s x MFU):
                                      FLOPs per token 6N + 12 L d T (model.llama.flops_per_token)
                                      x 16,384 tokens, x 4/3 with activation checkpointing (the
                                      recomputed forward); MFU assumed 25% eager, 35% compiled,
                                      0.8 of that under ZeRO-3
  + gpu_checks                        90 s (its own process: a small model's flash, flex and
                                      sync checks, then three compiled 10-step runs for resume)

which for the default set is 429 s (7.2 minutes): start-ups 65 s, rows 274 s (compile 180 s,
builds 35 s, steps 35 s, 24 s per-row overhead), gpu_checks 90 s. A row's timeout is 3x its
estimate and at least 60 s; a process's start-up likewise. The rows stop at ``--budget`` minus the checks'
estimate, the checks at ``--budget``, so the suite ends inside 10 minutes whatever the estimate
got wrong. The compile allowances are the largest and least certain term: the table prints
each row's wall time and warm-up (compile) time beside its estimate, so the first run on a
GPU calibrates them.

``--cpu`` runs the rows on the CPU (fp32; the estimate then assumes 1 GFLOP/s and CPU compile
times, and the timeouts are 10x, at least 120 s); ``--tiny`` swaps in a tiny model (d_model 64,
2 layers, vocabulary 512) at lengths 32 and 64. ``--cpu --tiny --variants eager --dist-variant
eager`` exercises every part of the suite (launchers, timeouts, logs, table) in about a minute;
compiled, a few minutes. tests/test_gpu_suite.py runs it with single and fsdp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONF = os.path.join(REPO, "conf")
sys.path.insert(0, os.path.join(REPO, "launch"))
import _bootstrap  # noqa: F401,E402  (repo on sys.path; deepspeed's --local_rank moved to LOCAL_RANK)

BACKENDS = ("single", "fsdp", "zero2", "zero3", "tp2")
TP_PROCS = 2  # the tp2 row: FSDP with tensor parallelism 2 (train/parallel/), one process per GPU
VARIANTS = ("eager", "compile", "compile-ac")
BACKEND_OVERRIDES = {"single": ["backend=single"], "fsdp": ["backend=fsdp"],
                     "zero2": ["backend=deepspeed", "backend.zero_stage=2"],
                     "zero3": ["backend=deepspeed", "backend.zero_stage=3"],
                     "tp2": ["backend=fsdp", f"backend.tp={TP_PROCS}"]}
VARIANT_OVERRIDES = {"eager": ["train.compile=false", "train.activation_checkpointing=false"],
                     "compile": ["train.compile=true", "train.activation_checkpointing=false"],
                     "compile-ac": ["train.compile=true", "train.activation_checkpointing=true"]}
GPU_SEQS = {2048: 8, 4096: 4}  # sequence length: micro-batch (16,384 tokens a step)
TINY_SEQS = {32: 4, 64: 2}
TINY_MODEL = ["model=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.vocab_size=512"]
SYNTHETIC_VOCAB = 32000  # the vocabulary of rows whose model config leaves it to the tokenizer
SEQ_KEYS = ("data.seq_len=", "train.micro_batch_size=")  # what rows sharing a trainer may differ in
# The default set (--full: every backend x model x length x variant): every variant at the
# target shape (1b, 4096), eager and compiled at 125m's own length, and each distributed
# backend at the target shape.
DEFAULT_SINGLE = {("125m", 2048, "eager"), ("125m", 2048, "compile"), ("1b", 4096, "eager"), ("1b", 4096, "compile"),
                  ("1b", 4096, "compile-ac")}
DEFAULT_DISTRIBUTED = {("1b", 4096)}
DUMP_SIGNAL = signal.SIGUSR2  # the worker's faulthandler writes its Python stacks on it


@dataclasses.dataclass
class Profile:
    """The assumptions of the expected total (see the module docstring)."""

    peak_flops: float
    mfu: dict
    zero3_factor: float
    start_s: dict  # per launcher
    row_s: float
    build_s: float
    build_s_per_bparam: float
    compile_first_s: float
    compile_next_s: float
    compile_shape_s: float
    compile_warm_s: float
    checks_s: float
    timeout_factor: float
    min_timeout_s: float


GPU = Profile(peak_flops=989.4e12, mfu={"eager": 0.25, "compile": 0.35}, zero3_factor=0.8,
              start_s={"python": 10, "torchrun": 15, "deepspeed": 20, "env": 10}, row_s=3, build_s=2,
              build_s_per_bparam=3, compile_first_s=45, compile_next_s=30, compile_shape_s=20, compile_warm_s=15,
              checks_s=90, timeout_factor=3, min_timeout_s=60)
CPU = Profile(peak_flops=1e9, mfu={"eager": 1.0, "compile": 1.0}, zero3_factor=1.0,
              start_s={"python": 15, "torchrun": 25, "deepspeed": 35, "env": 15}, row_s=2, build_s=2,
              build_s_per_bparam=60, compile_first_s=120, compile_next_s=60, compile_shape_s=40, compile_warm_s=30,
              checks_s=0, timeout_factor=10, min_timeout_s=120)


@dataclasses.dataclass
class Row:
    index: int
    name: str
    backend: str
    model: str
    seq: int
    micro: int
    variant: str
    overrides: list  # the row's own, then extra (from --set)
    steps: int
    warmup: int
    extra: list = dataclasses.field(default_factory=list)  # overrides added by --set
    group: str = ""  # rows of one process with the same group share a trainer
    estimate_s: float = 0.0
    timeout_s: float = 0.0
    log: str = ""
    unavailable: str = ""  # why this machine cannot run the row (the tp2 row on one GPU): skipped, not failed
    # filled in by the run
    status: str = "not run"
    result: dict = dataclasses.field(default_factory=dict)
    wall_s: Optional[float] = None
    error: list = dataclasses.field(default_factory=list)  # the log's last lines, for the table


def compose(overrides=(), config_name: str = "pretrain"):
    """The config launch/pretrain.py would see for these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


# -- the rows ------------------------------------------------------------------------------------
def build_rows(args) -> list[Row]:
    seqs = TINY_SEQS if args.tiny else GPU_SEQS
    if args.seqs:
        wanted = [int(s) for s in args.seqs.split(",")]
        unknown = [s for s in wanted if s not in seqs]
        if unknown:
            raise SystemExit(f"gpu_suite: --seqs {unknown}: known lengths are {sorted(seqs)}")
        seqs = {s: seqs[s] for s in wanted}
    models = ["tiny"] if args.tiny else (args.models.split(",") if args.models else ["125m", "1b"])
    backends = args.backends.split(",")
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"gpu_suite: --backends: unknown backend {b!r} (known: {', '.join(BACKENDS)})")
    variants = args.variants.split(",")
    for v in variants + [args.dist_variant]:
        if v not in VARIANTS:
            raise SystemExit(f"gpu_suite: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    max_seq = max(seqs)
    rows: list[Row] = []
    for backend in backends:
        for model in models:
            for variant in (variants if backend == "single" else [args.dist_variant]):
                for seq, micro in seqs.items():
                    if not (args.full or args.tiny) and (
                            (model, seq, variant) not in DEFAULT_SINGLE if backend == "single"
                            else (model, seq) not in DEFAULT_DISTRIBUTED):
                        continue
                    name = f"{backend}-{model}-s{seq}-{variant}"
                    if args.cpu:
                        base = ["train.device=cpu"]
                    else:
                        base = ["train=gpu", "train.device=cuda"]
                    model_ov = TINY_MODEL if model == "tiny" else [f"model={model}"]
                    ov = (base + model_ov + [f"model.max_seq_len={max_seq}", f"data.seq_len={seq}",
                                             f"train.micro_batch_size={micro}", "train.grad_accum_steps=1"]
                          + VARIANT_OVERRIDES[variant] + BACKEND_OVERRIDES[backend])
                    rows.append(Row(len(rows) + 1, name, backend, model, seq, micro, variant, ov,
                                    args.steps, args.warmup))
    if args.only:
        rows = [r for r in rows if re.search(args.only, r.name)]
        for i, r in enumerate(rows):
            r.index = i + 1
    for pattern, kv in args.set or ():
        if "=" not in kv:
            raise SystemExit(f"gpu_suite: --set {pattern} {kv}: expected KEY=VALUE")
        for r in rows:
            if re.search(pattern, r.name):
                key, value = kv.split("=", 1)
                if key == "bench.steps":
                    r.steps = int(value)
                elif key == "bench.warmup":
                    r.warmup = int(value)
                else:
                    r.overrides.append(kv)
                    r.extra.append(kv)
    for r in rows:
        r.group = " ".join(o for o in r.overrides if not o.startswith(SEQ_KEYS))
        if r.backend == "tp2":
            r.unavailable = tp_unavailable(args)
            if r.unavailable:
                r.status, r.error = "SKIPPED", [r.unavailable]
    return rows


def tp_unavailable(args) -> str:
    """Why the tp2 row cannot run here ("" when it can): it needs TP_PROCS processes, one per GPU
    (on the CPU, gloo processes)."""
    if args.launcher == "env":
        return f"tensor parallelism needs {TP_PROCS} processes; --launcher env starts one"
    if args.cpu:
        return ""
    import torch

    n = torch.cuda.device_count()
    return "" if n >= TP_PROCS else f"tensor parallelism (backend.tp={TP_PROCS}) needs {TP_PROCS} GPUs; this machine has {n}"


def launcher_of(backend: str, launcher: str) -> str:
    if launcher == "env" or backend == "single":
        return "python" if backend == "single" else "env"
    return "torchrun" if backend in ("fsdp", "tp2") else "deepspeed"


def processes(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """(backend, its rows in order): one process each, in the order the backends come (rows this
    machine cannot run left out)."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        if r.unavailable:
            continue
        out.setdefault(r.backend, []).append(r)
    return list(out.items())


def row_flops(r: Row, cache: dict) -> tuple[float, float]:
    """(training FLOPs per step, parameters) of a row, from its composed model config."""
    key = tuple(o for o in r.overrides if o.startswith("model"))  # all the model config depends on
    if key not in cache:
        try:
            from omegaconf import OmegaConf

            from model.llama import ModelConfig, param_count

            cfg = compose(key)
            mc = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
            if mc.vocab_size is None:
                mc.vocab_size = SYNTHETIC_VOCAB
            cache[key] = (mc, float(param_count(mc)))
        except Exception:  # the row will fail with its traceback when it runs; estimate it as empty
            cache[key] = (None, 0.0)
    mc, params = cache[key]
    if mc is None:
        return 0.0, 0.0
    from model.llama import flops_per_token

    per_step = flops_per_token(mc, r.seq) * r.seq * r.micro * (4 / 3 if r.variant == "compile-ac" else 1)
    return per_step, params


def estimate(rows: list[Row], prof: Profile, launcher: str, checks: bool) -> dict:
    """Fills each row's estimate and timeout; returns the totals (see the module docstring)."""
    cache: dict = {}
    starts, total_rows = [], 0.0
    parts = {"compile": 0.0, "build": 0.0, "steps": 0.0, "per row": 0.0}
    on_disk: set = set()  # graphs compiled by earlier processes: Inductor's caches on disk have them
    for backend, prows in processes(rows):
        how = launcher_of(backend, launcher)
        starts.append((backend, how, prof.start_s[how]))
        compiled_before, prev, here = False, None, set()
        for r in prows:
            per_step, params = row_flops(r, cache)
            compiled = r.variant != "eager"
            # what the compiled graphs depend on: shapes, recomputation, and parameter dtype (fp32
            # under autocast for single; bf16 copies under FSDP's policy and DeepSpeed's bf16)
            graph = (r.group.replace(" ".join(BACKEND_OVERRIDES[r.backend]), ""), r.seq, r.micro,
                     r.backend == "single")
            part = {"per row": prof.row_s, "build": 0.0, "compile": 0.0}
            if r.group != prev:
                part["build"] = prof.build_s + prof.build_s_per_bparam * params / 1e9
            if compiled:
                if graph in on_disk:
                    part["compile"] = prof.compile_warm_s
                elif r.group == prev:
                    part["compile"] = prof.compile_shape_s
                else:
                    part["compile"] = prof.compile_next_s if compiled_before else prof.compile_first_s
                here.add(graph)
            compiled_before = compiled_before or compiled
            rate = prof.peak_flops * prof.mfu["compile" if compiled else "eager"]
            rate *= prof.zero3_factor if r.backend == "zero3" else 1.0
            part["steps"] = (r.warmup + r.steps) * per_step / rate
            for k, v in part.items():
                parts[k] += v
            e = sum(part.values())
            r.estimate_s = e
            r.timeout_s = float(math.ceil(max(prof.min_timeout_s, prof.timeout_factor * e)))
            total_rows += e
            prev = r.group
        on_disk |= here
    start_total = sum(s for _, _, s in starts)
    checks_s = prof.checks_s if checks else 0.0
    return {"starts": starts, "rows": total_rows, "parts": parts, "start": start_total, "checks": checks_s,
            "total": start_total + total_rows + checks_s}


def start_timeout(prof: Profile, how: str) -> float:
    return float(math.ceil(max(prof.min_timeout_s, prof.timeout_factor * prof.start_s[how])))


def print_plan(rows: list[Row], totals: dict, prof: Profile, args) -> None:
    n_proc = len(totals["starts"])
    print(f"[gpu_suite] {len(rows)} rows in {n_proc} processes"
          f"{' + gpu_checks' if totals['checks'] else ''}; per row {args.warmup} warm-up + {args.steps} timed "
          f"steps (unless --set bench.*)", flush=True)
    print(f"  {'#':>3}  {'row':<34} {'overrides beyond the row name':<40} {'est s':>6} {'timeout s':>9}")
    procs = dict((b, (how, s)) for b, how, s in totals["starts"])
    for backend, prows in processes(rows):
        how, s = procs[backend]
        print(f"  process {backend} ({how}): start-up est {s:.0f} s, timeout {start_timeout(prof, how):.0f} s")
        for r in prows:
            extra = " ".join(r.extra)
            if (r.steps, r.warmup) != (args.steps, args.warmup):
                extra = f"{extra} steps={r.steps} warmup={r.warmup}".strip()
            print(f"  {r.index:>3}  {r.name:<34} {extra or '-':<40} {r.estimate_s:>6.0f} {r.timeout_s:>9.0f}")
    for r in rows:
        if r.unavailable:
            print(f"  skipped {r.name}: {r.unavailable}")
    if totals["checks"]:
        print(f"  gpu_checks (benchmarks/gpu_checks.py): est {totals['checks']:.0f} s, "
              f"timeout {checks_timeout(prof):.0f} s")
    budget = f"; the suite stops at --budget {args.budget:.0f} s" if args.budget else ""
    if args.budget and totals["total"] > args.budget:
        budget += " (LESS than expected: the last rows will be SKIPPED; raise --budget)"
    print(f"[gpu_suite] expected total: {totals['total']:.0f} s ({totals['total'] / 60:.1f} min) = start-ups "
          f"{totals['start']:.0f} s + rows {totals['rows']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in totals["parts"].items())
          + f") + gpu_checks {totals['checks']:.0f} s{budget}",
          flush=True)


def checks_timeout(prof: Profile) -> float:
    return float(math.ceil(max(prof.min_timeout_s, prof.timeout_factor * prof.checks_s)))


# -- the driver ----------------------------------------------------------------------------------
def tail(path: str, n: int = 40, before: Optional[str] = None) -> list[str]:
    """The last ``n`` non-empty lines of a log (of the part before the line ``before``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    if before and before in text:
        text = text[:text.rindex(before)]
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-n:]


TIMEOUT_MARK = "[gpu_suite] TIMEOUT:"


def stuck_in(path: str) -> list[str]:
    """Where a killed row was: the innermost frame of the thread faulthandler dumped as current
    (after the timeout mark), as ``stuck in: File "...", line N in f``; [] if none was written."""
    text = "\n".join(tail(path, 2000))
    if TIMEOUT_MARK not in text:
        return []
    dump = text[text.rindex(TIMEOUT_MARK):].splitlines()
    starts = [i for i, ln in enumerate(dump) if ln.startswith("Current thread")] or \
        [i for i, ln in enumerate(dump) if ln.startswith("Thread ")]
    for ln in dump[starts[0] + 1:] if starts else []:
        if ln.strip().startswith("File "):
            return [f"stuck in: {ln.strip()}"]
    return []


class Suite:
    def __init__(self, args, rows: list[Row], prof: Profile):
        self.args, self.rows, self.prof = args, rows, prof
        self.results = os.path.abspath(args.results)
        self.logs = os.path.join(self.results, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.t0 = time.monotonic()
        reserve = prof.checks_s if self.run_checks else 0.0
        self.rows_end = self.t0 + args.budget - reserve if args.budget else math.inf
        self.launches = 0
        for r in rows:
            r.log = os.path.join(self.logs, f"{r.index:02d}-{r.name}.log")

    @property
    def run_checks(self) -> bool:
        return not (self.args.cpu or self.args.no_checks)

    def say(self, msg: str) -> None:
        print(f"[gpu_suite] {msg}", flush=True)

    def run(self) -> None:
        for backend, prows in processes(self.rows):
            pending = list(prows)
            while pending:
                if time.monotonic() >= self.rows_end:
                    for r in pending:
                        r.status, r.error = "SKIPPED", [f"suite budget of {self.args.budget:.0f} s spent"]
                    break
                pending = self.launch(backend, pending)

    def command(self, backend: str, plan: str) -> tuple[list, dict]:
        how = launcher_of(backend, self.args.launcher)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.args.cpu:
            env.setdefault("OMP_NUM_THREADS", "1")
        port = str(_free_port())
        me = [os.path.abspath(__file__), "--worker", plan]
        if how == "torchrun":
            nproc = str(TP_PROCS if backend == "tp2" else 1)
            return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_port", port,
                    *me], env
        if how == "deepspeed":
            return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", port,
                    *me], env
        if how == "env":  # what torchrun / the DeepSpeed launcher set for one process
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        return [sys.executable, *me], env

    def launch(self, backend: str, pending: list[Row]) -> list[Row]:
        """Run ``pending`` in one process; returns the rows still to run (in a new process)."""
        self.launches += 1
        k = self.launches
        tag = f"{k:02d}-{backend}"
        events_path = os.path.join(self.logs, f"proc{tag}.events.jsonl")
        plan_path = os.path.join(self.logs, f"proc{tag}.plan.json")
        proc_log = os.path.join(self.logs, f"proc{tag}.log")
        with open(plan_path, "w") as f:
            json.dump({"events": events_path, "tmp": os.path.join(self.results, "tmp"),
                       "rows": [dataclasses.asdict(r) for r in pending]}, f, indent=1)
        open(events_path, "w").close()
        cmd, env = self.command(backend, plan_path)
        how = launcher_of(backend, self.args.launcher)
        self.say(f"process {tag} ({how}): rows {', '.join(r.name for r in pending)}; its output: {proc_log}")
        with open(proc_log, "ab") as out:
            set_env = " ".join(f"{k}={env[k]}" for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if k in env)
            out.write(f"$ {set_env + ' ' if set_env else ''}{' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        by_index = {r.index: r for r in pending}
        pending = list(pending)
        events = open(events_path)
        current: Optional[Row] = None
        started_at = time.monotonic()
        deadline = min(started_at + start_timeout(self.prof, how), self.rows_end)
        worker_pid, ready, buf = None, False, ""
        try:
            while True:
                exited = proc.poll() is not None
                chunk = events.read()
                buf += chunk
                lines = buf.split("\n")
                buf = lines.pop()
                for line in lines:
                    ev = json.loads(line)
                    now = time.monotonic()
                    if ev["ev"] == "pid":
                        worker_pid = ev["pid"]
                    elif ev["ev"] == "ready":
                        ready = True
                        deadline = min(now + 60, self.rows_end)  # the first row starts at once
                    elif ev["ev"] == "start":
                        current = by_index[ev["row"]]
                        current.wall_s, started_at = None, now
                        deadline = min(now + current.timeout_s, self.rows_end)
                    elif ev["ev"] in ("done", "error"):
                        r = by_index[ev["row"]]
                        r.wall_s = now - started_at
                        if ev["ev"] == "done":
                            r.status, r.result = "ok", ev["result"]
                        else:
                            r.status, r.error = "FAILED", tail(r.log, 3)
                        pending.remove(r)
                        current = None
                        deadline = min(now + 60, self.rows_end)  # until the next row starts, or exit
                        self.report(r)
                    elif ev["ev"] == "finished":
                        deadline = time.monotonic() + 60  # leaving the process group, exiting
                if exited:
                    rc = proc.returncode
                    if current is not None:
                        current.status = "FAILED"
                        current.error = [f"process exited with status {rc} in this row"] + tail(current.log, 3)
                        current.wall_s = time.monotonic() - started_at
                        pending.remove(current)
                        self.report(current)
                    elif not ready:
                        why = [f"process exited with status {rc} before its first row"] + tail(proc_log, 3)
                        for r in pending:
                            r.status, r.error = "FAILED", why
                            self.report(r)
                        return []
                    return pending
                if time.monotonic() > deadline:
                    if current is not None:
                        current.wall_s = time.monotonic() - started_at
                    return self.timed_out(proc, worker_pid, plan_path, current, pending, ready, proc_log, how)
                time.sleep(0.1)
        finally:
            events.close()
            _kill(proc, worker_pid, plan_path)

    def timed_out(self, proc, worker_pid, plan_path, current, pending, ready, proc_log, how) -> list[Row]:
        budget = time.monotonic() >= self.rows_end
        if current is not None:
            limit = f"suite budget of {self.args.budget:.0f} s" if budget else f"timeout {current.timeout_s:.0f} s"
            with open(current.log, "a") as f:
                f.write(f"\n{TIMEOUT_MARK} still running {current.wall_s:.0f} s after it started ({limit}); the "
                        "worker's Python stacks follow, then it is killed\n")
            if worker_pid:
                try:
                    os.kill(worker_pid, DUMP_SIGNAL)
                except ProcessLookupError:
                    pass
                time.sleep(self.args.dump_wait)
            _kill(proc, worker_pid, plan_path)
            current.status = "TIMEOUT"
            current.error = [f"killed: {limit}"] + stuck_in(current.log) + tail(current.log, 2, before=TIMEOUT_MARK)
            pending.remove(current)
            self.report(current)
        elif not ready:
            _kill(proc, worker_pid, plan_path)
            why = ([f"suite budget of {self.args.budget:.0f} s spent during the process's start-up"] if budget else
                   [f"process start-up took over {start_timeout(self.prof, how):.0f} s"]) + tail(proc_log, 3)
            for r in pending:
                r.status, r.error = "SKIPPED" if budget else "TIMEOUT", why
                self.report(r)
            return []
        else:  # between rows or leaving: the rows done are done
            _kill(proc, worker_pid, plan_path)
            self.say(f"process did not exit or start its next row in time: killed (see {proc_log})")
        if budget:
            for r in pending:
                r.status, r.error = "SKIPPED", [f"suite budget of {self.args.budget:.0f} s spent"]
            return []
        return pending

    def report(self, r: Row) -> None:
        wall = f" in {r.wall_s:.0f} s (est {r.estimate_s:.0f} s)" if r.wall_s is not None else ""
        if r.status == "ok":
            res = r.result
            mfu = f", MFU {res['mfu']:.1%}" if res.get("mfu") is not None else ""
            self.say(f"row {r.index} {r.name}: ok{wall}: {res['tokens_per_s']:,.0f} tokens/s{mfu}")
        else:
            self.say(f"row {r.index} {r.name}: {r.status}{wall}: {' | '.join(r.error)} (log: {r.log})")

    def checks(self) -> list[tuple[str, str, str]]:
        """benchmarks/gpu_checks.py in its own process: [(check, PASS/FAIL/..., message)]."""
        if not self.run_checks:
            return []
        log = os.path.join(self.logs, "gpu_checks.log")
        limit = min(checks_timeout(self.prof), max(0.0, self.t0 + self.args.budget - time.monotonic())
                    if self.args.budget else math.inf)
        self.say(f"gpu_checks: benchmarks/gpu_checks.py, timeout {limit:.0f} s, output: {log}")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_checks.py")], cwd=REPO,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill(proc)
                rc = None
        found = []
        for line in tail(log, 10_000):
            m = re.match(r"(PASS|FAIL) (\w+): (.*)", line)
            if m:
                found.append((m.group(2), m.group(1), m.group(3)))
        if rc is None:
            found.append(("gpu_checks", "TIMEOUT", f"killed after {limit:.0f} s: " + " | ".join(tail(log, 2))))
        elif rc not in (0, 1) or not found:
            found.append(("gpu_checks", "FAILED", f"exit status {rc}: " + " | ".join(tail(log, 3))))
        return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc, worker_pid: Optional[int] = None, plan: Optional[str] = None) -> None:
    """SIGKILL what this suite started, and only that: the worker (checked to be alive and to be
    the one running ``plan``, so a reused pid is left alone) with its process group (torchrun
    starts its workers in sessions of their own, out of reach of the launcher's group), then the
    group of ``proc`` (started with start_new_session) while ``proc`` is not yet reaped; then
    reap ``proc``. Never this process's own group."""
    own = os.getpgrp()
    if worker_pid and plan:
        try:
            with open(f"/proc/{worker_pid}/cmdline", "rb") as f:
                ours = plan.encode() in f.read().split(b"\0")
            if ours:
                group = os.getpgid(worker_pid)
                if group == worker_pid and group != own:  # a session of its own (torchrun's workers)
                    os.killpg(group, signal.SIGKILL)
                os.kill(worker_pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def cell(lines: list[str], width: int = 200) -> str:
    text = " ⏎ ".join(ln.strip()[:width] for ln in lines)
    return text.replace("|", "\\|")


def note(res: dict) -> list[str]:
    left = res.get("left_by_earlier_rows_gib")
    return [f"note: {left:.2f} GiB of earlier rows were still allocated (counted in max allocated)"] \
        if left and left > 0.01 else []


def table(rows: list[Row], checks: list, header: list[str]) -> str:
    out = list(header)
    out += ["", "| # | row | backend | model | seq | micro | compile | AC | status | tokens/s | ms/step | MFU | "
            "max allocated GiB | max reserved GiB | graphs / breaks | loss | warm-up s | row s | est s | "
            "error (last lines of the row's log) or note |",
            "|" + " --- |" * 20]
    def num(res: dict, key: str, fmt: str) -> str:
        return fmt.format(res[key]) if res.get(key) is not None else "-"

    for r in rows:
        res = r.result
        out.append("| " + " | ".join([
            str(r.index), r.name, r.backend, r.model, str(r.seq), str(r.micro),
            "yes" if r.variant != "eager" else "no", "yes" if r.variant == "compile-ac" else "no", r.status,
            num(res, "tokens_per_s", "{:,.0f}"), num(res, "ms_per_step", "{:.1f}"), num(res, "mfu", "{:.1%}"),
            num(res, "max_allocated_gib", "{:.2f}"), num(res, "max_reserved_gib", "{:.2f}"),
            f"{res['graphs']} / {res['graph_breaks']}" if "graphs" in res else "-", num(res, "loss", "{:.3f}"),
            num(res, "warmup_s", "{:.1f}"), f"{r.wall_s:.0f}" if r.wall_s is not None else "-",
            f"{r.estimate_s:.0f}", cell(r.error or note(res))]) + " |")
    if checks:
        out += ["", "| CUDA check (benchmarks/gpu_checks.py) | result | message |", "| --- | --- | --- |"]
        out += [f"| {name} | {status} | {cell([msg], 400)} |" for name, status, msg in checks]
    bad = [r for r in rows if r.status not in ("ok", "SKIPPED")]
    for r in bad:
        out += ["", f"{r.status} {r.name}: the last lines of {r.log}:", "```"] + tail(r.log, 25) + ["```"]
    return "\n".join(out) + "\n"


def header_lines(args) -> list[str]:
    lines = [f"date (UTC): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        lines.append(f"kiln commit: {rev or '?'}")
    except (OSError, subprocess.SubprocessError):
        pass
    if args.cpu:
        lines.append(f"device: CPU ({os.cpu_count()} cores)")
    else:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            smi = "nvidia-smi not available"
        lines.append(f"device: {smi}")
    import torch

    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}); steps {args.warmup} warm-up + "
                 f"{args.steps} timed per row; random tokens; memory over the timed steps")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list each row, its timeout and the expected total; run nothing")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (train.device=cpu; no gpu_checks)")
    p.add_argument("--tiny", action="store_true", help="a tiny model at lengths 32 and 64 (with --cpu: seconds)")
    p.add_argument("--full", action="store_true", help="distributed backends at every model and length too")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, in the order run")
    p.add_argument("--models", default=None, help="comma-separated model configs (default 125m,1b)")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths among the known ones")
    p.add_argument("--variants", default=",".join(VARIANTS), help="the single backend's variants")
    p.add_argument("--dist-variant", default="compile", help="the variant fsdp/zero2/zero3 run")
    p.add_argument("--only", default=None, help="keep the rows whose name matches this regex")
    p.add_argument("--set", nargs=2, action="append", metavar=("ROWS", "KEY=VALUE"),
                   help="one more override for rows matching the regex ROWS (bench.steps / bench.warmup: "
                        "that row's step counts)")
    p.add_argument("--timeout", nargs=2, action="append", metavar=("ROWS", "SECONDS"),
                   help="the timeout of rows matching the regex ROWS")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 3; --tiny 1)")
    p.add_argument("--launcher", choices=("native", "env"), default="native",
                   help="native: torchrun / the DeepSpeed launcher; env: their variables, plain python")
    p.add_argument("--budget", type=float, default=None,
                   help="stop the suite after this many seconds (default 570; --cpu: none)")
    p.add_argument("--no-checks", action="store_true", help="skip benchmarks/gpu_checks.py")
    p.add_argument("--results", default=None, help="directory for the logs and the table "
                                                   "(default runs/gpu_suite-<UTC time>)")
    p.add_argument("--dump-wait", type=float, default=3.0, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.tiny else 10
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 3
    if args.budget is None:
        args.budget = 0.0 if args.cpu else 570.0
    if args.results is None:
        args.results = os.path.join(REPO, "runs", f"gpu_suite-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    rows = build_rows(args)
    if not rows:
        print("gpu_suite: no row selected", file=sys.stderr)
        return 2
    prof = CPU if args.cpu else GPU
    totals = estimate(rows, prof, args.launcher, checks=not (args.cpu or args.no_checks))
    for pattern, seconds in args.timeout or ():
        for r in rows:
            if re.search(pattern, r.name):
                r.timeout_s = float(seconds)
    print_plan(rows, totals, prof, args)
    if args.dry_run:
        return 0
    head = header_lines(args)
    for line in head:
        print(f"[gpu_suite] {line}", flush=True)
    suite = Suite(args, rows, prof)
    suite.run()
    checks = suite.checks()
    elapsed = time.monotonic() - suite.t0
    head.append(f"suite wall time {elapsed:.0f} s (expected {totals['total']:.0f} s); logs: {suite.logs}")
    text = table(rows, checks, head)
    with open(os.path.join(suite.results, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(suite.results, "results.json"), "w") as f:
        json.dump({"header": head, "expected_total_s": totals["total"], "wall_s": elapsed,
                   "rows": [dataclasses.asdict(r) for r in rows],
                   "checks": [{"check": c, "status": s, "message": m} for c, s, m in checks]}, f, indent=1)
    print(text, flush=True)
    failed = [r for r in rows if r.status != "ok" and not r.unavailable] + [c for c in checks if c[1] != "PASS"]
    print(f"[gpu_suite] {len(rows) - len([r for r in rows if r.status != 'ok'])}/{len(rows)} rows ok"
          f"{f', {len(checks)} checks' if checks else ''}; table: {os.path.join(suite.results, 'table.md')}",
          flush=True)
    return 1 if failed else 0


# -- the worker: one process, its backend's rows ------------------------------------------------
class _Held:
    """The trainer that rows of one group share."""

    def __init__(self, tmp: str):
        self.trainer, self.group, self.tmp, self.run_dir = None, None, tmp, None

    def drop(self) -> None:
        import gc
        import shutil

        import torch

        if self.trainer is not None:
            tr = self.trainer
            if hasattr(tr.train_batches, "close"):
                tr.train_batches.close()
            if getattr(tr, "run_lock", None) is not None:
                tr.run_lock.release()
            self.trainer = tr = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.group = self.run_dir = None


def _synthetic_trainer(cfg):
    """The trainer itself (model set-up, backend, forward_backward, backend.step) with no
    tokenizer and no data pipeline: the rows feed it random tokens."""
    from types import SimpleNamespace

    from train.tasks.pretrain import PretrainTask
    from train.trainer import Trainer

    vocab = cfg.model.vocab_size or SYNTHETIC_VOCAB

    class SyntheticPretraining(PretrainTask):  # the loop's task hooks: no tokenizer, no data
        def build_tokenizer(self):
            return SimpleNamespace(vocab_size=vocab, path=None)

        def build_data(self):
            return iter(()), []

    return Trainer(cfg, SyntheticPretraining(cfg))


def _run_row(row: dict, held: _Held, phase: dict) -> dict:
    """Time one row; ``phase["config"]`` stays true until its config composed and validated
    (an error before that leaves the process as it was)."""
    import resource

    import torch
    from torch._dynamo.utils import counters

    from model.llama import flops_per_token
    from train.config import validate

    t_row = time.perf_counter()
    shared = held.trainer is not None and held.group == row["group"]
    run_dir = held.run_dir if shared else os.path.join(held.tmp, f"row{row['index']:02d}")
    cfg = compose(row["overrides"] + [f"run_dir={run_dir}"])
    validate(cfg)
    phase["config"] = False
    build_s, left = 0.0, None
    if not shared:
        held.drop()
        if torch.cuda.is_available():  # what earlier rows of this process failed to free
            left = torch.cuda.memory_allocated() / 2**30
        held.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        t = time.perf_counter()
        held.trainer = _synthetic_trainer(cfg)
        held.group = row["group"]
        build_s = time.perf_counter() - t
    tr = held.trainer
    b, dev = tr.backend, tr.backend.device
    cuda = dev.type == "cuda"
    B, T, A = int(cfg.train.micro_batch_size), int(cfg.data.seq_len), int(cfg.train.grad_accum_steps)
    vocab = tr.model_cfg.vocab_size
    gen = torch.Generator().manual_seed(row["index"])
    batches = []
    for _ in range(A):
        x = torch.randint(0, vocab, (B, T + 1), generator=gen)
        batches.append({"input": x[:, :-1], "target": x[:, 1:]})
    lr, clip = float(cfg.optim.lr), float(cfg.optim.grad_clip)
    loss = None

    def step():
        nonlocal loss
        loss = tr.forward_backward(batches)[0]
        b.step(lr, clip)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if cuda:
        torch.cuda.empty_cache()
    sync()
    t = time.perf_counter()
    for _ in range(row["warmup"]):
        step()
    sync()
    warmup_s = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    for _ in range(row["steps"]):
        step()
    sync()
    dt = time.perf_counter() - t
    steps = row["steps"]
    tps = B * T * A * b.world_size * steps / dt if steps else None
    mfu = flops_per_token(tr.model_cfg, T) * tps / b.world_size / tr.peak if (tr.peak and tps) else None
    result = {"tokens_per_s": tps, "ms_per_step": dt / steps * 1000 if steps else None, "mfu": mfu,
              "loss": float(loss) if loss is not None else None, "build_s": build_s, "warmup_s": warmup_s,
              "graphs": counters["stats"]["unique_graphs"] - graphs0,
              "graph_breaks": sum(counters["graph_break"].values()) - breaks0,
              "world_size": b.world_size, "bf16": bool(b.bf16), "device": str(dev),
              "left_by_earlier_rows_gib": left,
              "worker_s": time.perf_counter() - t_row}
    if cuda:
        result["max_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        result["max_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
    else:
        result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[gpu_suite] {row['name']}: {json.dumps(result)}", flush=True)
    return result


def worker(plan_path: str) -> int:
    """Run a plan's rows in this process, each row's output (file descriptors 1 and 2, so
    torch's and NCCL's too) into its own log, and tell the driver through the events file."""
    import faulthandler
    import traceback

    with open(plan_path) as f:
        plan = json.load(f)
    events = open(plan["events"], "a")

    rank = int(os.environ.get("RANK", "0") or 0)  # the tp2 row's ranks past 0: own logs, no events

    def emit(**ev) -> None:
        if rank == 0:
            events.write(json.dumps(ev) + "\n")
            events.flush()

    emit(ev="pid", pid=os.getpid())  # first: the driver can end this process from now on
    faulthandler.register(DUMP_SIGNAL, all_threads=True)  # writes to fd 2: the current row's log
    import torch

    import train.trainer  # noqa: F401  (imports before the first row, so that its time is the row's)

    # Each shape compiled static, as in a real run (not dynamic once a second shape is seen,
    # nor from a profile an earlier process left), and room for every shape of the process.
    for key, value in (("automatic_dynamic_shapes", False), ("automatic_dynamic_local_pgo", False),
                       ("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024),
                       ("accumulated_cache_size_limit", 1024)):
        if hasattr(torch._dynamo.config, key):  # names differ between torch releases
            setattr(torch._dynamo.config, key, value)
    held = _Held(plan["tmp"])
    saved = os.dup(1), os.dup(2)
    emit(ev="ready", pid=os.getpid())
    code = 0
    for row in plan["rows"]:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(row["log"] + (f".rank{rank}" if rank else ""), "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        emit(ev="start", row=row["index"])
        print(f"[gpu_suite] row {row['index']} {row['name']}: overrides {' '.join(row['overrides'])}; "
              f"{row['warmup']} warm-up + {row['steps']} timed steps", flush=True)
        phase = {"config": True}
        try:
            result = _run_row(row, held, phase)
        except BaseException:  # the whole traceback into the row's log, last, then tell the driver
            traceback.print_exc()
            sys.stderr.flush()
            emit(ev="error", row=row["index"])
            if not phase["config"]:  # its CUDA / process-group state is not trusted: the rest in a new process
                code = 3
                break
            continue
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        emit(ev="done", row=row["index"], result=result)
    try:  # leave the process group as the launchers do (DeepSpeed on a CPU: its shared-memory segment too)
        if held.trainer is not None:
            held.trainer.backend.shutdown()
        else:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    except Exception:
        traceback.print_exc()
    if code == 0:
        held.drop()
        emit(ev="finished")
    sys.stdout.flush()
    sys.stderr.flush()
    events.close()
    os._exit(code)  # no interpreter teardown: see launch/_bootstrap.leave


if __name__ == "__main__":
    sys.exit(main())
