"""Deduplicate prepare_data outputs across all tasks: exact and MinHash, in stages (library
code: ``launch/dedup_global.py`` and ``slurm/dedup_global.sbatch`` are command lines over it).

``prepare_data`` removes duplicates within one task's files; at crawl scale most copies
are in other files. This job compares every document with every other one, in four
stages that each run as a Slurm array (task i of N, from SLURM_ARRAY_TASK_ID/_COUNT or
--task/--tasks) or all at once locally (``--stage all``):

1. ``signatures``: for the output files i, i+N, ... : each document's exact-content key and
   its MinHash band keys (``data.minhash_dedup``: FineWeb's 5-gram shingles, 14 x 8), to
   ``<work>/sig/<file>.npz``, and its id and URL, to ``<work>/ids/<file>.{bytes,offsets}.npy``
   (read by position, memory-mapped, when the filter stage audits a drop).
2. ``buckets``: task b takes the bands b, b+N, ... (band -1, the exact key, goes to task 0),
   sorts the keys of every document for its bands and writes each document that shares a
   key with an earlier one as an edge to the first holder of that key: memory is one band's
   keys at a time, never all signatures.
3. ``clusters`` (one task): union-find over the edges; in each cluster the survivor is the
   earliest document by (input file index, position in the file), so the result does not
   depend on N or on the order tasks ran; ``<work>/remove/<file>.npy`` lists the others
   (rows of the file) and ``<work>/remove/<file>.survivors.npz`` the document kept for each
   one's duplicate cluster (``kept``: the cluster root's global id, file index << 32 | row)
   and whether the texts are the same (``exact``; else the dropped document is a MinHash near
   duplicate of some document of the cluster, not necessarily of the kept one: clusters are
   chains of pairs).
4. ``filter``: rewrites the output files i, i+N, ... without them into --output-dir, with
   ``.done`` markers holding the counts, and beside each output the audit of its drops
   (``<output>.audit.jsonl.gz``, prepare_data's format, data_pipeline/audit.py): one line
   per removed document, step ``global_dedup``, reason ``exact_duplicate`` or
   ``near_duplicate``, and the ``kept_id``, ``kept_url`` and ``kept_file`` of the document
   kept for its duplicate cluster (from the ids and URLs the signatures stage recorded: the
   filter never reads another input file), so ``launch/why_dropped.py`` on the output
   directory names it.

A stage's outputs are written atomically and a rerun skips finished ones, as for
prepare_data. Inputs: the finished outputs of a prepare_data run, ``--format jsonl``
(``*.jsonl.gz``) or ``--format tokens`` (``*.bin`` shards: their documents are decoded with
the directory's tokenizer to be compared, and the kept ones are written back as token
shards with the same tokenizer, ids, URLs and done markers, so training reads them as is).

    python launch/dedup_global.py --input-dir data/prepared --work-dir data/dedup-work --output-dir data/dedup
    sbatch --array=0-99 slurm/dedup_global.sbatch --stage signatures --input-dir ... --work-dir ...
"""

from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np

from data_pipeline.runner import is_done, read_done, write_done

log = logging.getLogger(__name__)


class DedupInputError(ValueError):
    """The inputs or the work directory cannot be used (the command line prints it, exit 2)."""


STAGES = ("signatures", "buckets", "clusters", "filter")
EXACT_BAND = -1
STEP = "global_dedup"  # the step name of the filter's audit lines
ROW_MASK = 0xFFFFFFFF  # a global id is file index << 32 | row


def input_files(input_dir: str) -> list[str]:
    """The JSONL outputs of ``input_dir``, or else its finished token shards (with .done)."""
    from data_pipeline.audit import AUDIT_SUFFIX
    from data_pipeline.token_shards import DOCS_META_SUFFIX

    names = sorted(os.listdir(input_dir))
    files = [os.path.join(input_dir, n) for n in names
             if n.endswith(".jsonl.gz") and not n.endswith((AUDIT_SUFFIX, DOCS_META_SUFFIX))]
    files = files or [os.path.join(input_dir, n) for n in names
                      if n.endswith(".bin") and os.path.exists(os.path.join(input_dir, n + ".done"))]
    if not files:
        raise DedupInputError(f"dedup_global: no finished *.jsonl.gz or *.bin in {input_dir} "
                         "(run launch/prepare_data.py --format jsonl or --format tokens)")
    return files


_TOKENIZERS: dict = {}


def _tokenizer_of(path: str):
    from data_pipeline.token_shards import TOKENIZER_FILE
    from data_pipeline.tokenizer import Tokenizer

    tok = os.path.join(os.path.dirname(path), TOKENIZER_FILE)
    if tok not in _TOKENIZERS:
        if not os.path.isfile(tok):
            raise DedupInputError(f"dedup_global: {path} is a token shard but {tok} is missing")
        _TOKENIZERS[tok] = Tokenizer(tok)
    return _TOKENIZERS[tok]


def read_docs(path: str):
    """Each document of an input file as a dict with ``text`` (token shards: decoded, without
    the closing EOS) and, for token shards, ``ids`` (the tokens as stored)."""
    if path.endswith(".bin"):
        from data_pipeline.token_shards import read_token_shard

        tok = _tokenizer_of(path)
        for row in read_token_shard(path):
            yield {**row, "text": tok.decode(row["ids"][:-1].tolist())}
        return
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _id_url_rows(path: str) -> list[tuple[str, str]]:
    """Each document's (id, URL) of an input file (token shards: from the ids and URLs kept
    beside them, without decoding the tokens)."""
    if path.endswith(".bin"):
        from data_pipeline.token_shards import read_token_shard

        docs = read_token_shard(path)
    else:
        docs = read_docs(path)
    return [_id_url(doc) for doc in docs]


def _id_url(doc: dict) -> tuple[str, str]:
    return tuple("" if doc.get(k) is None else str(doc[k]) for k in ("id", "url"))


def _id_record_paths(work: str, i: int) -> tuple[str, str]:
    base = os.path.join(work, "ids", f"{i:06d}")
    return base + ".bytes.npy", base + ".offsets.npy"


def _save_id_records(work: str, i: int, rows: list[tuple[str, str]]) -> None:
    """The ids and URLs of file ``i``, UTF-8 one after the other, and where each starts: the
    filter stage finds a kept document's by its row, memory-mapped (the pages of the rows it
    needs), instead of reading that document's input file up to it. The offsets are written
    last: they mark the record finished."""
    parts = [s.encode("utf-8") for row in rows for s in row]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)))
    blob, at = _id_record_paths(work, i)
    _save_atomic(blob, np.frombuffer(b"".join(parts), dtype=np.uint8))
    _save_atomic(at, offsets)


def _save_atomic(path: str, array: np.ndarray | None = None, **arrays) -> None:
    """One array (.npy) or several (.npz), written under a temporary name and renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        if array is not None:
            np.save(f, array)
        else:
            np.savez(f, **arrays)
    os.replace(tmp, path)


def stage_signatures(files, work, task, tasks, data_cfg) -> None:
    from data_pipeline.dedup import ExactDedup, MinHasher

    m = data_cfg.minhash_dedup
    hasher = MinHasher(m.ngram, m.num_bands, m.rows_per_band, m.seed)
    for i in range(task, len(files), tasks):
        out = os.path.join(work, "sig", f"{i:06d}.npz")
        if os.path.exists(out):
            if not os.path.exists(_id_record_paths(work, i)[1]):  # signed before ids and URLs were recorded
                _save_id_records(work, i, _id_url_rows(files[i]))
            continue
        exact, bands, names = [], [], []
        for doc in read_docs(files[i]):
            names.append(_id_url(doc))
            exact.append(ExactDedup.key(doc["text"]))
            sig = hasher.signature(doc["text"])
            # A text without shingles gets unique band keys: it is compared exactly only.
            bands.append(hasher.band_keys(sig) if sig is not None else [0] * m.num_bands)
        exact_a = np.asarray(exact, dtype=np.int64)
        bands_a = np.asarray(bands, dtype=np.int64).reshape(len(exact), m.num_bands)
        no_sig = np.all(bands_a == 0, axis=1)
        _save_id_records(work, i, names)  # first: a signed file always has its ids and URLs
        _save_atomic(out, exact=exact_a, bands=bands_a, no_sig=no_sig)


def check_inputs(work: str, files: list[str], data_cfg) -> None:
    """The work directory belongs to one input set and one MinHash setting: the first stage
    to run records them, every later run must see the same (a changed input set would
    silently reuse stale signatures and removal lists)."""
    m = data_cfg.minhash_dedup
    mine = {"files": [os.path.basename(f) for f in files],
            "minhash": [int(m.ngram), int(m.num_bands), int(m.rows_per_band), int(m.seed)]}
    path = os.path.join(work, "inputs.json")
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(path):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(mine, f)
        os.replace(tmp, path)
        return
    with open(path) as f:
        theirs = json.load(f)
    if theirs != mine:
        raise DedupInputError(f"dedup_global: {work} was made for other inputs or MinHash settings ({len(theirs['files'])} "
                         f"files, minhash {theirs['minhash']}; now {len(files)} files, minhash {mine['minhash']}): "
                         "use a new --work-dir")


def _global_ids(file_index: int, n: int) -> np.ndarray:
    return (np.int64(file_index) << np.int64(32)) | np.arange(n, dtype=np.int64)


def stage_buckets(files, work, task, tasks, data_cfg) -> None:
    num_bands = data_cfg.minhash_dedup.num_bands
    mine = [b for b in [EXACT_BAND, *range(num_bands)] if (b + 1) % tasks == task]
    for band in mine:
        out = os.path.join(work, "edges", f"band{band + 1:03d}.npy")
        if os.path.exists(out):
            continue
        keys, ids = [], []
        for i in range(len(files)):
            with np.load(os.path.join(work, "sig", f"{i:06d}.npz")) as z:
                if band == EXACT_BAND:
                    k = z["exact"]
                    keep = np.ones(len(k), dtype=bool)
                else:
                    k = z["bands"][:, band]
                    keep = ~z["no_sig"]
            keys.append(k[keep])
            ids.append(_global_ids(i, len(k))[keep])
        k, g = np.concatenate(keys), np.concatenate(ids)
        order = np.lexsort((g, k))  # by key, then by document: the first of a run holds the key first
        k, g = k[order], g[order]
        starts = np.r_[True, k[1:] != k[:-1]]
        first = g[np.maximum.accumulate(np.where(starts, np.arange(len(k)), 0))]
        edges = np.stack([first[~starts], g[~starts]], axis=1) if len(k) else np.zeros((0, 2), np.int64)
        _save_atomic(out, edges)


def stage_clusters(files, work, data_cfg) -> dict:
    done = os.path.join(work, "remove", "clusters.json")
    # A work directory from before survivors were recorded is clustered again (same result).
    if os.path.exists(done) and all(os.path.exists(_survivors_path(work, i)) for i in range(len(files))):
        with open(done) as f:
            return json.load(f)
    num_bands = data_cfg.minhash_dedup.num_bands
    parts = [np.load(os.path.join(work, "edges", f"band{b + 1:03d}.npy")) for b in [EXACT_BAND, *range(num_bands)]]
    edges = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:  # the smaller id (earlier file, earlier document) stays the root: the one kept
            parent[max(ra, rb)] = min(ra, rb)
    gone = np.asarray(sorted(x for x in parent if find(x) != x), dtype=np.int64)  # by file, then row
    roots = np.asarray([find(x) for x in gone.tolist()], dtype=np.int64)
    keys = _exact_keys(work, len(files), np.concatenate([gone, roots]))
    exact = keys[: len(gone)] == keys[len(gone):]
    bounds = np.searchsorted(gone >> 32, np.arange(len(files) + 1))
    for i in range(len(files)):  # the kept roots first: a removal list always has them
        mine = slice(bounds[i], bounds[i + 1])
        _save_atomic(_survivors_path(work, i), kept=roots[mine], exact=exact[mine])
        _save_atomic(os.path.join(work, "remove", f"{i:06d}.npy"), gone[mine] & ROW_MASK)
    summary = {"files": len(files), "edges": int(len(edges)), "removed": int(len(gone)),
               "clusters": len({find(x) for x in parent})}
    tmp = f"{done}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f)
    os.replace(tmp, done)
    return summary


def _survivors_path(work: str, i: int) -> str:
    return os.path.join(work, "remove", f"{i:06d}.survivors.npz")


def _exact_keys(work: str, n_files: int, gids: np.ndarray) -> np.ndarray:
    """The exact-content key of each document ``gids``, loading each file's keys once."""
    keys = np.zeros(len(gids), dtype=np.int64)
    order = np.argsort(gids >> 32, kind="stable")
    bounds = np.searchsorted((gids >> 32)[order], np.arange(n_files + 1))
    for i in range(n_files):
        at = order[bounds[i]:bounds[i + 1]]
        if len(at):
            with np.load(os.path.join(work, "sig", f"{i:06d}.npz")) as z:
                keys[at] = z["exact"][gids[at] & ROW_MASK]
    return keys


def _ids_and_urls(files: list[str], work: str, f: int, rows: list[int]) -> list[tuple[str, str]]:
    """``(id, url)`` of the documents at ``rows`` of input file ``f``, from the records of the
    signatures stage: only their pages are read, never a document, so a filter task's reads
    grow with its drops, not with the size of every file they point to."""
    blob_path, at_path = _id_record_paths(work, f)
    if not os.path.exists(at_path):  # a work directory signed by an older version: recorded once, here
        log.warning("%s: no ids and URLs recorded for %s (signed by an older version): reading it once to "
                    "record them", work, files[f])
        _save_id_records(work, f, _id_url_rows(files[f]))
    blob, at = np.load(blob_path, mmap_mode="r"), np.load(at_path, mmap_mode="r")

    def text(k: int) -> str:
        return bytes(blob[at[k]:at[k + 1]]).decode("utf-8")

    return [(text(2 * r), text(2 * r + 1)) for r in rows]


def _survivors(files: list[str], work: str, i: int, drop: np.ndarray) -> dict[int, dict] | None:
    """For each removed row of file ``i``: its reason and the audit facts (id, URL, file) of
    the document kept for its duplicate cluster, the cluster's earliest document (the dropped
    one may resemble it only through other members of the cluster); None for a work directory
    clustered before these were recorded (rerun the clusters stage to get them)."""
    path = _survivors_path(work, i)
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        kept, exact = z["kept"], z["exact"]
    if len(kept) != len(drop):
        raise DedupInputError(f"dedup_global: {path} does not match its removal list: rerun the clusters stage")
    wanted: dict[int, list[int]] = {}
    for g in kept.tolist():
        wanted.setdefault(g >> 32, []).append(g & ROW_MASK)
    where = {f: dict(zip(rows, _ids_and_urls(files, work, f, rows))) for f, rows in wanted.items()}
    out = {}
    for row, g, same in zip(drop.tolist(), kept.tolist(), exact.tolist()):
        kept_id, kept_url = where[g >> 32][g & ROW_MASK]
        out[row] = {"reason": "exact_duplicate" if same else "near_duplicate",
                    "details": {"kept_id": kept_id, "kept_url": kept_url, "kept_file": files[g >> 32]}}
    return out


def stage_filter(files, work, out_dir, task, tasks) -> None:
    from data_pipeline.audit import AUDIT_SUFFIX, Audit

    os.makedirs(out_dir, exist_ok=True)
    for i in range(task, len(files), tasks):
        out = os.path.join(out_dir, os.path.basename(files[i]))
        if is_done(out):
            continue
        drop = np.load(os.path.join(work, "remove", f"{i:06d}.npy"))
        removed = _survivors(files, work, i, drop)
        audit = Audit(out + AUDIT_SUFFIX) if removed is not None else None
        if removed is None:
            log.warning("%s: no survivors recorded in %s (clustered by an older version): no audit written; "
                        "rerun the clusters stage for one", out, work)
            removed = dict.fromkeys(drop.tolist())
        try:
            if files[i].endswith(".bin"):
                counts = _filter_token_shard(files[i], out, removed, audit)
            else:
                counts = {"docs": _write_jsonl(out, _not_removed(read_docs(files[i]), removed, audit, files[i]))}
        except BaseException:
            if audit is not None:
                audit.abandon()
            raise
        stats = {"input": files[i], "output": out, **counts, "removed_as_duplicates": len(drop)}
        if audit is not None:
            audit.close()  # before the done marker: a finished output always has its audit
            stats["audit"] = {"path": audit.path, "lines": audit.lines}
        write_done(out, stats)


def _not_removed(docs, removed: dict, audit, path: str):
    """The documents whose position is not in ``removed``; each removed one is audited
    with the document kept for its duplicate cluster."""
    for j, doc in enumerate(docs):
        if j not in removed:
            yield doc
        elif audit is not None:
            audit.dropped(STEP, removed[j]["reason"], url=doc.get("url") or "", doc_id=doc.get("id") or "",
                          file=path, offset=j, details=removed[j]["details"])


def _write_jsonl(out: str, docs) -> int:
    tmp, n = f"{out}.tmp{os.getpid()}", 0
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=5) as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n


def _filter_token_shard(path: str, out: str, removed: dict, audit) -> dict:
    """A token shard without the rows in ``removed``, with the source's tokenizer beside it;
    returns the counts for the done marker."""
    from data_pipeline.token_shards import install_tokenizer, read_token_shard, write_token_rows

    install_tokenizer(_tokenizer_of(path).path, os.path.dirname(out))
    rows = _not_removed(read_token_shard(path), removed, audit, path)
    return write_token_rows(rows, out[: -len(".bin")], read_done(path))


def run_stage(stage: str, files: list[str], work: str, task: int, tasks: int, data_cfg,
              out_dir: str | None = None) -> dict | None:
    """Task ``task`` of ``tasks`` of one stage (``clusters`` runs in task 0 only and returns
    its summary); any executor (a Slurm array, a loop, a pool) calls this per task."""
    if stage == "signatures":
        stage_signatures(files, work, task, tasks, data_cfg)
    elif stage == "buckets":
        stage_buckets(files, work, task, tasks, data_cfg)
    elif stage == "clusters":
        return stage_clusters(files, work, data_cfg) if task == 0 else None
    elif stage == "filter":
        if not out_dir:
            raise ValueError("the filter stage needs an output directory")
        stage_filter(files, work, out_dir, task, tasks)
    else:
        raise ValueError(f"unknown stage {stage!r} ({' | '.join(STAGES)})")
    return None
