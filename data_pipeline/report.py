"""Run report: what each step kept and removed, why, in which language, with examples.

Filtering decisions are only trustworthy when someone looks at them; the report puts the
numbers (docs and bytes per step and reason), the language mix and a few removed
documents per reason side by side, as markdown plus a PNG chart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from data_pipeline.step import StepStats


def _stats(step) -> tuple[str, StepStats, dict]:
    if isinstance(step, tuple):  # (name, StepStats or as_dict(), examples) from merged task stats
        name, st, ex = step
        if isinstance(st, dict):
            merged = StepStats()
            merged.merge(st)
            st = merged
        return name, st, ex or {}
    return step.name, step.stats, dict(step.stats.examples_by_reason)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _clip(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return (text[:n] + " …") if len(text) > n else text


def write_report(steps: Sequence, out_dir: str, title: str = "Data pipeline report") -> dict:
    """Write ``report.md``, ``report.png`` and ``stats.json`` to ``out_dir``; return the stats.

    ``steps`` are pipeline steps or readers (anything with ``name`` and ``stats``), in run
    order, or ``(name, stats_dict, examples)`` tuples from merged prepare_data tasks.
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = [_stats(s) for s in steps]
    lines = [f"# {title}", "", "## Steps", "",
             "| step | seen | kept | removed | kept % | MB seen | MB kept | MB removed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, st, _ in rows:
        pct = 100.0 * st.kept / st.seen if st.seen else 0.0
        removed_bytes = sum(st.bytes_removed_by_reason.values())
        lines.append(f"| {name} | {st.seen} | {st.kept} | {st.removed} | {pct:.1f} | {_mb(st.bytes_seen)} | "
                     f"{_mb(st.bytes_kept)} | {_mb(removed_bytes)} |")
    lines += ["", "## Removed, by reason", "", "| step | reason | docs | MB |", "|---|---|---:|---:|"]
    for name, st, _ in rows:
        for reason, n in st.removed_by_reason.most_common():
            lines.append(f"| {name} | {reason} | {n} | {_mb(st.bytes_removed_by_reason.get(reason, 0))} |")
    langs = sorted({lang for _, st, _ in rows for lang in (*st.kept_by_language, *st.removed_by_language)})
    if langs:
        lines += ["", "## By language (kept / removed)", "",
                  "| step | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
        for name, st, _ in rows:
            cells = [f"{st.kept_by_language.get(lang, 0)} / {st.removed_by_language.get(lang, 0)}" for lang in langs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Removed examples", ""]
    for name, _, examples in rows:
        for reason, exs in sorted(examples.items()):
            lines.append(f"### {name}: {reason}")
            for ex in exs:
                lines.append(f"- `{ex.get('url') or ex.get('id')}`: {_clip(ex.get('text', ''))}")
            lines.append("")
    lines += ["", "![docs per step](report.png)", ""]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    stats = {name: {**st.as_dict(), "examples": examples} for name, st, examples in rows}
    with open(os.path.join(out_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    _chart(rows, os.path.join(out_dir, "report.png"))
    return stats


def _chart(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    kept = [r[1].kept for r in rows]
    removed = [r[1].removed for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    y = range(len(rows))[::-1]
    ax.barh(list(y), kept, color="#3a7d44", label="kept")
    ax.barh(list(y), removed, left=kept, color="#c8553d", label="removed")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names)
    ax.set_xlabel("documents")
    ax.set_title("Documents kept / removed per step")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
