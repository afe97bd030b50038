"""What an RLHF run leaves for people: curves of reward, KL and response length
(``rl_curves.png``) and a before/after table of held-out generations (``generations.md``),
both from the files the run wrote (metrics.jsonl, eval_samples.jsonl)."""

from __future__ import annotations

import json
import os
from typing import Optional

EVAL_SAMPLES = "eval_samples.jsonl"  # one line per held-out evaluation: its metrics and samples


def _records(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def plot_rl(metrics_path: str, out_png: str, title: str) -> Optional[str]:
    """Three panels against step: reward (train batch mean, held-out mean), KL to the
    reference (summed over the reply, k1), response length."""
    if not os.path.exists(metrics_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(metrics_path)
    train = {r["step"]: r for r in recs if r.get("kind") == "train" and "reward_mean" in r}
    evals = {r["step"]: r for r in recs if r.get("kind") == "eval" and "eval_reward_mean" in r}
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    panels = (("reward_mean", "eval_reward_mean", "reward"), ("kl", "eval_kl", "KL to reference (nats/reply)"),
              ("response_len", "eval_response_len", "response length (tokens)"))
    for ax, (key, ekey, label) in zip(axes, panels):
        s = sorted(train)
        ax.plot(s, [train[i][key] for i in s], "-", label="rollout batches")
        e = sorted(evals)
        if e:
            ax.plot(e, [evals[i][ekey] for i in e], "o--", label="held-out prompts")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "*(empty)*"


def write_generations(path: str, run_dir: str, algo: str, rows: int = 8) -> Optional[str]:
    """The first and the last held-out evaluation's samples side by side."""
    src = os.path.join(run_dir, EVAL_SAMPLES)
    if not os.path.exists(src):
        return None
    evals = _records(src)
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    lines = [f"# {algo.upper()}: held-out samples before (step {first['step']}) and after (step {last['step']})", "",
             f"Mean reward {first['eval_reward_mean']:.3f} -> {last['eval_reward_mean']:.3f}; KL to the reference "
             f"{first['eval_kl']:.3f} -> {last['eval_kl']:.3f} nats per reply (same prompts, same sampling seed).", "",
             "| prompt | before | reward | after | reward |", "| --- | --- | --- | --- | --- |"]
    for a, z in list(zip(first["samples"], last["samples"]))[:rows]:
        lines.append(f"| {_cell(a['prompt'])} | {_cell(a['reply'])} | {a['reward']:.2f} | {_cell(z['reply'])} | "
                     f"{z['reward']:.2f} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
