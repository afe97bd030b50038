"""One array task of offline data preparation, as library code any launcher calls.

A task handles the input files ``i, i + N, i + 2N, ...`` of the configured sources for
task ``i`` of ``N`` (a Slurm array's SLURM_ARRAY_TASK_ID / _COUNT, or any other executor's
numbering): it runs the reader and the step chain over each file and writes the survivors
(JSONL, Parquet or token shards) to a temporary name, renames it into place and then
marks it done with ``<name>.done`` (the step stats). A rerun skips files whose marker
exists, so a preempted array is simply resubmitted. ``summarize`` merges the stats of all
finished files into one report. ``launch/prepare_data.py`` is the command line over it;
``data_pipeline/global_dedup.py`` holds the cross-task dedup stages that follow.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import time

log = logging.getLogger(__name__)
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def load_data_cfg(overrides: list[str]):
    """The ``data`` block of the pretraining config with these Hydra overrides, checked: a
    bad value raises kiln's ConfigError naming its key, before any file is read."""
    from hydra import compose, initialize_config_dir

    from train.config import register_configs, validate_data

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="pretrain", overrides=overrides).data
    validate_data(cfg)
    return cfg


def task_files(cfg, shard_index: int, num_shards: int) -> list[tuple[int, object, str]]:
    """(global file index, source config, path) for this task, over all sources' files."""
    from data_pipeline.readers import expand_paths

    files = []
    for src in cfg.sources:
        for path in expand_paths(list(src.paths)):
            files.append((src, path))
    return [(i, src, path) for i, (src, path) in enumerate(files) if i % num_shards == shard_index]


EXTENSIONS = {"jsonl": "jsonl.gz", "parquet": "parquet", "tokens": "bin"}


def output_name(index: int, src, path: str, fmt: str) -> str:
    base = os.path.basename(path).split(".")[0]
    return f"{src.name}-{index:05d}-{base}.{EXTENSIONS[fmt]}"


def process_file(cfg, src, path: str, out_path: str, fmt: str, tokenizer=None, audit: str = "") -> dict:
    """Run reader + steps over one input file, write the survivors atomically, return stats.
    ``audit`` ("drops" or "text"): also write every drop's decision (and with "text" the
    removed text) to ``<output>.audit.jsonl.gz`` (data_pipeline/audit.py)."""
    from data_pipeline.audit import AUDIT_SUFFIX, Audit
    from data_pipeline.pipeline import build_reader, build_steps

    reader = build_reader(src)
    reader.files = [path]
    reader.set_shard(0, 1)
    steps = build_steps(cfg) if src.steps else []
    log = Audit(out_path + AUDIT_SUFFIX, with_text=audit == "text") if audit else None
    for part in (reader, *steps):
        part.audit = log
    try:
        stats = _write_survivors(reader, steps, out_path, fmt, tokenizer)
    except BaseException:
        if log:
            log.abandon()
        raise
    if log:
        log.close()
        stats["audit"] = {"path": log.path, "lines": log.lines}
    return stats


def _write_survivors(reader, steps, out_path: str, fmt: str, tokenizer) -> dict:
    from data_pipeline.text import CODE_LINES

    path = reader.files[0]
    docs = iter(reader)
    for step in steps:
        docs = step(docs)
    t0, n = time.time(), 0
    if fmt == "tokens":
        from data_pipeline.token_shards import write_token_shard

        counts = write_token_shard(docs, tokenizer, out_path[: -len(".bin")])
        return {"input": path, "output": out_path, **counts, "seconds": round(time.time() - t0, 3),
                "steps": [[s.name, s.stats.as_dict(), dict(s.stats.examples_by_reason)] for s in [reader, *steps]]}
    tmp = out_path + f".tmp{os.getpid()}"
    rows = ({"id": d.id, "text": d.text, "url": d.url, "source": d.source,
             "metadata": {k: v for k, v in d.metadata.items() if k not in ("token_ids", CODE_LINES)}} for d in docs)
    if fmt == "jsonl":
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=5) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        batch = []
        schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string()),
                            ("source", pa.string()), ("metadata", pa.string())])
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in rows:
                row["metadata"] = json.dumps(row["metadata"], ensure_ascii=False)
                batch.append(row)
                n += 1
                if len(batch) >= 1000:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    os.replace(tmp, out_path)
    return {"input": path, "output": out_path, "docs": n, "seconds": round(time.time() - t0, 3),
            "steps": [[s.name, s.stats.as_dict(), dict(s.stats.examples_by_reason)] for s in [reader, *steps]]}


DONE_SUFFIX = ".done"


def write_done(out_path: str, stats: dict) -> None:
    """Mark ``out_path`` finished with its stats: written under a temporary name and renamed,
    so a crash leaves either no marker or a whole one (the one writer of every ``.done``)."""
    tmp = f"{out_path}{DONE_SUFFIX}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False)
    os.replace(tmp, out_path + DONE_SUFFIX)


def read_done(out_path: str) -> dict:
    """The stats in ``out_path``'s marker; a marker that is not a whole JSON object (cut short
    by a crash of an older, non-atomic writer, or damaged since) is a ValueError naming it."""
    marker = out_path + DONE_SUFFIX
    with open(marker, encoding="utf-8") as f:
        text = f.read()
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{marker}: corrupt done marker ({e}); delete it and rerun the task that wrote "
                         f"{os.path.basename(out_path)}") from None
    if not isinstance(stats, dict):
        raise ValueError(f"{marker}: corrupt done marker (not a JSON object); delete it and rerun the task")
    return stats


def is_done(out_path: str) -> bool:
    """Whether ``out_path`` is finished: its marker exists and reads whole. A corrupt marker
    means not finished (logged): a rerun redoes the file instead of trusting it."""
    if not os.path.exists(out_path + DONE_SUFFIX):
        return False
    try:
        read_done(out_path)
    except ValueError as e:
        log.warning("%s: redoing it", e)
        return False
    return True


def summarize(output_dir: str) -> dict:
    """Merge the stats of every finished output file into one report in ``output_dir/report``."""
    from data_pipeline.report import write_report
    from data_pipeline.step import StepStats

    order, merged, examples = [], {}, {}
    for marker in sorted(glob.glob(os.path.join(output_dir, "*" + DONE_SUFFIX))):
        stats = read_done(marker[: -len(DONE_SUFFIX)])
        for name, st, ex in stats["steps"]:
            if name not in merged:
                order.append(name)
                merged[name], examples[name] = StepStats(), {}
            merged[name].merge(st)
            for reason, exs in ex.items():
                examples[name].setdefault(reason, []).extend(exs[: 3 - len(examples[name].get(reason, []))])
    return write_report([(n, merged[n], examples[n]) for n in order], os.path.join(output_dir, "report"),
                        title=f"prepare_data report: {output_dir}")


def run_task(cfg, output_dir: str, shard_index: int, num_shards: int, fmt: str = "jsonl", tokenizer=None,
             audit: str = ""):
    """Process this task's input files; yields ``(input, output, stats)`` per file, ``stats``
    None for a file already done (the command line prints the progress)."""
    for index, src, path in task_files(cfg, shard_index, num_shards):
        out_path = os.path.join(output_dir, output_name(index, src, path, fmt))
        if is_done(out_path):
            yield path, out_path, None
            continue
        stats = process_file(cfg, src, path, out_path, fmt, tokenizer, audit)
        write_done(out_path, stats)
        yield path, out_path, stats
