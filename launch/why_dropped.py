"""Why was this URL dropped? Reads the audits ``prepare_data --audit`` wrote, or those
``dedup_global`` writes beside its outputs (each cross-file duplicate with the document kept
for its duplicate cluster).

    python launch/why_dropped.py <prepare_data or dedup_global output dir> <url> [<url> ...]
    python launch/why_dropped.py <output dir> --contains docs.python.org/3.11/genindex

For each URL: the step, reason, statistic and threshold that dropped it, the input file
and the record's position there; or that it was kept (it is in an output file), or that
no audited task saw it. Exit status 0 when every URL was found (dropped or kept), 1 if some
were not seen, 2 on a usage error.
"""

import _bootstrap  # noqa: F401

import argparse
import os
import sys

from data_pipeline.audit import audit_files, kept_documents, read_audits


def kept_urls(directory: str, wanted) -> set[str]:
    """URLs among ``wanted`` that are in the outputs (kept documents), in any output format:
    JSONL, Parquet or token shards (``--format tokens`` keeps each document's id and URL)."""
    return {d["url"] for d in kept_documents(directory) if d["url"] and wanted(d["url"])}


def describe(row: dict) -> str:
    stat = f", {row['stat']} against {row['limit']}" if "stat" in row else ""
    lang = ""
    if "language" in row:  # the score is the statistic of a low-score drop; a wrong language's is said here
        lang = f" ({row['language']})" if "stat" in row else f", language {row['language']} at {row['language_score']}"
    dup = ""
    if "kept_id" in row:
        kept = f"{row.get('kept_url') or '?'} (id {row.get('kept_id') or '?'}"
        # global dedup names the earliest document of the cluster, in another file: the dropped
        # one may resemble it only through other copies; prepare_data's dedup, the one it matched
        dup = (f", the document kept for its duplicate cluster is {kept} in {row['kept_file']})" if row.get("kept_file")
               else f", duplicate of {kept})")
    where = f"{row['file']} at {row['offset']}" if row.get("file") else "?"
    return f"dropped by {row['step']}: {row['reason']}{stat}{lang}{dup} ({where})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir", help="a launch/prepare_data.py --output-dir that was run with --audit, or a "
                    "launch/dedup_global.py --output-dir")
    ap.add_argument("urls", nargs="*", help="exact URLs")
    ap.add_argument("--contains", help="every URL containing this text instead")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.output_dir):
        ap.error(f"{a.output_dir}: not a directory")
    files = audit_files(a.output_dir)
    if not files:
        print(f"why_dropped: no *.audit.jsonl.gz in {a.output_dir}: run launch/prepare_data.py with --audit "
              "(launch/dedup_global.py's filter stage writes them always)",
              file=sys.stderr)
        return 2
    if not a.urls and not a.contains:
        ap.error("give URLs or --contains TEXT")
    urls = set(a.urls)
    wanted = (lambda u: a.contains in u) if a.contains else (lambda u: u in urls)
    dropped: dict[str, list[dict]] = {}
    for row in read_audits(files):
        if row.get("url") and wanted(row["url"]):
            dropped.setdefault(row["url"], []).append(row)
    kept = kept_urls(a.output_dir, wanted)
    missing = 0
    for url in sorted(urls | set(dropped) | kept):
        if url in dropped:
            for row in dropped[url]:
                print(f"{url}: {describe(row)}")
        elif url in kept:
            print(f"{url}: kept")
        else:
            print(f"{url}: not seen by any audited task (not in the inputs, or its task ran without --audit)")
            missing += 1
    if a.contains and not (dropped or kept):
        print(f"no URL containing {a.contains!r} in the audits or outputs")
        return 1
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
