"""Deduplicate prepare_data outputs across all tasks: the command line over
``data_pipeline/global_dedup.py`` (its docstring describes the four stages).

    python launch/dedup_global.py --input-dir data/prepared --work-dir data/dedup-work --output-dir data/dedup
    sbatch --array=0-99 slurm/dedup_global.sbatch --stage signatures --input-dir ... --work-dir ...
"""

import _bootstrap  # noqa: F401

import argparse
import os
import sys

from data_pipeline.global_dedup import STAGES, DedupInputError, check_inputs, input_files, run_stage
from data_pipeline.runner import load_data_cfg
from train.errors import ConfigError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    ap.add_argument("--input-dir", required=True,
                    help="a launch/prepare_data.py --format jsonl or --format tokens output directory")
    ap.add_argument("--work-dir", required=True, help="signatures, edges and removal lists")
    ap.add_argument("--output-dir", help="where the deduplicated files go (stage filter / all)")
    ap.add_argument("--task", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
    ap.add_argument("--tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1")))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the data config (data.minhash_dedup.*)")
    a = ap.parse_args(argv)
    if not 0 <= a.task < a.tasks:
        ap.error(f"--task {a.task} out of range for --tasks {a.tasks}")
    if a.stage in ("filter", "all") and not a.output_dir:
        ap.error("--output-dir is needed for the filter stage")
    try:
        cfg = load_data_cfg(list(a.overrides))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    if cfg.minhash_dedup.threshold > 0:
        ap.error("data.minhash_dedup.threshold > 0 is not supported here: the staged job trusts band collisions "
                 "(FineWeb's setting, threshold 0)")
    try:
        files = input_files(a.input_dir)
        check_inputs(a.work_dir, files, cfg)
    except DedupInputError as e:
        print(str(e), file=sys.stderr)
        return 2
    stages = STAGES if a.stage == "all" else (a.stage,)
    tasks = [(t, a.tasks) for t in range(a.tasks)] if a.stage == "all" else [(a.task, a.tasks)]
    for stage in stages:
        for task, n in tasks:
            summary = run_stage(stage, files, a.work_dir, task, n, cfg, a.output_dir)
            if summary is not None:
                print(f"[dedup_global] {summary['files']} files: {summary['removed']} duplicates in "
                      f"{summary['clusters']} clusters removed ({summary['edges']} edges)", flush=True)
        print(f"[dedup_global] stage {stage} done (task {a.task}/{a.tasks})" if a.stage != "all"
              else f"[dedup_global] stage {stage} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
