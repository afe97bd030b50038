"""Offline preparation: run the data steps over input shards and write filtered shards.
The command line over ``data_pipeline/runner.py`` (where the task logic lives).

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
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable from a clone without installation (the other scripts: _bootstrap)
    sys.path.insert(0, REPO)

from data_pipeline import runner  # noqa: E402


def load_data_cfg(overrides: list[str]):
    """The checked ``data`` block; a bad value ends the process naming its key (exit 2)."""
    from train.errors import ConfigError

    try:
        return runner.load_data_cfg(overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)


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
        runner.summarize(a.output_dir)
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
    for path, out_path, stats in runner.run_task(cfg, a.output_dir, a.shard_index, a.num_shards, a.format,
                                                 tokenizer, a.audit or ""):
        if stats is None:
            skipped += 1
            continue
        done += 1
        tokens = f", {stats['tokens']:,} tokens" if "tokens" in stats else ""
        print(f"[prepare_data] {path} -> {out_path}: {stats['docs']} docs{tokens} in {stats['seconds']} s", flush=True)
    print(f"[prepare_data] task {a.shard_index}/{a.num_shards}: {done} files written, {skipped} already done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
