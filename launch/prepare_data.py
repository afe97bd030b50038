"""Offline preparation: run the data steps over input shards and write filtered shards.

One task handles the input files ``i, i + N, i + 2N, ...`` for ``--shard-index i`` of
``--num-shards N`` (defaults: ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``), so the
same command runs as a Slurm array job::

    sbatch --array=0-99 --wrap "python launch/prepare_data.py --output-dir /data/prepared \\
        --num-shards 100 data=sample 'data.sources.0.paths=[/crawl/*.warc.gz]'"

Every output file is written to a temporary name, renamed into place, and then marked
done with ``<name>.done`` (holding the step stats); a rerun skips files whose marker
exists, so a preempted array job is simply resubmitted. ``--summarize`` merges the stats
of all finished files into one report (markdown, PNG, JSON).

The step chain and thresholds come from the ``data`` config group (Hydra overrides after
the options), exactly as training would apply them. The trainer reads the result with a
source ``{format: jsonl, paths: [<output-dir>/*.jsonl.gz], steps: false}``. With
``--format tokens --tokenizer T`` the documents are tokenized too and written as flat token
files (``data_pipeline/token_shards.py``), read by a source ``{format: tokens, paths:
[<output-dir>]}``; the tokenizer is copied beside them. Dedup runs per
task (set ``data.exact_dedup.mode=global data.minhash_dedup.mode=global`` to lift the
capacity bound within a task); duplicates across tasks are not removed.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def load_data_cfg(overrides: list[str]):
    """The ``data`` block, checked: a bad value ends the process naming its key (exit 2),
    before any file is read."""
    from hydra import compose, initialize_config_dir

    from train.config import ConfigError, register_configs, validate_data

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose(config_name="pretrain", overrides=overrides).data
    try:
        validate_data(cfg)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
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


def write_done(out_path: str, stats: dict) -> None:
    tmp = out_path + ".done.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False)
    os.replace(tmp, out_path + ".done")


def summarize(output_dir: str) -> dict:
    """Merge the stats of every finished output file into one report in ``output_dir/report``."""
    from data_pipeline.report import write_report
    from data_pipeline.step import StepStats

    order, merged, examples = [], {}, {}
    for marker in sorted(glob.glob(os.path.join(output_dir, "*.done"))):
        with open(marker, encoding="utf-8") as f:
            stats = json.load(f)
        for name, st, ex in stats["steps"]:
            if name not in merged:
                order.append(name)
                merged[name], examples[name] = StepStats(), {}
            merged[name].merge(st)
            for reason, exs in ex.items():
                examples[name].setdefault(reason, []).extend(exs[: 3 - len(examples[name].get(reason, []))])
    return write_report([(n, merged[n], examples[n]) for n in order], os.path.join(output_dir, "report"),
                        title=f"prepare_data report: {output_dir}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--shard-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
    ap.add_argument("--num-shards", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1")))
    ap.add_argument("--format", choices=["jsonl", "parquet", "tokens"], default="jsonl",
                    help="tokens: flat token files for format: tokens training sources (needs --tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece model for --format tokens")
    ap.add_argument("--input", nargs="*", default=None, help="input files/globs (replace data.sources paths)")
    ap.add_argument("--input-format", default=None, help="format of --input (warc | wet | jsonl | parquet)")
    ap.add_argument("--summarize", action="store_true", help="only merge finished tasks' stats into a report")
    ap.add_argument("--audit", choices=["drops", "text"], default=None,
                    help="write each drop's decision (URL, file, offset, step, reason, statistic) beside each "
                         "output as <output>.audit.jsonl.gz; 'text' adds the removed text. "
                         "launch/why_dropped.py reads them")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the data config, e.g. data.langid.min_score=0.5")
    a = ap.parse_args(argv)
    os.makedirs(a.output_dir, exist_ok=True)
    if a.summarize:
        summarize(a.output_dir)
        print(f"[prepare_data] report written to {os.path.join(a.output_dir, 'report')}")
        return 0
    if not 0 <= a.shard_index < a.num_shards:
        ap.error(f"--shard-index {a.shard_index} out of range for --num-shards {a.num_shards}")
    cfg = load_data_cfg(list(a.overrides))
    tokenizer = None
    if a.format == "tokens":
        if not a.tokenizer or not os.path.isfile(a.tokenizer):
            ap.error(f"--format tokens needs --tokenizer <tokenizer.model> (got {a.tokenizer!r})")
        from data_pipeline.token_shards import install_tokenizer
        from data_pipeline.tokenizer import Tokenizer

        tokenizer = Tokenizer(a.tokenizer)
        install_tokenizer(a.tokenizer, a.output_dir)
    if a.input:  # one source named like the config's first, reading the given files
        cfg.sources = cfg.sources[:1]
        cfg.sources[0].paths = list(a.input)
        if a.input_format:
            cfg.sources[0].format = a.input_format
    done = skipped = 0
    for index, src, path in task_files(cfg, a.shard_index, a.num_shards):
        out_path = os.path.join(a.output_dir, output_name(index, src, path, a.format))
        if os.path.exists(out_path + ".done"):
            skipped += 1
            continue
        stats = process_file(cfg, src, path, out_path, a.format, tokenizer, a.audit or "")
        write_done(out_path, stats)
        done += 1
        tokens = f", {stats['tokens']:,} tokens" if "tokens" in stats else ""
        print(f"[prepare_data] {path} -> {out_path}: {stats['docs']} docs{tokens} in {stats['seconds']} s", flush=True)
    print(f"[prepare_data] task {a.shard_index}/{a.num_shards}: {done} files written, {skipped} already done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
