"""Where training numbers go: stdout, metrics.jsonl, wandb (offline by default),
TensorBoard, and a PNG of the loss curves at the end. Only rank 0 logs."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Optional

import torch

# Dense bf16 tensor-core peak per device, from the vendors' datasheets, matched against
# torch.cuda.get_device_name() in this order (variants before the family: an H100 PCIe is
# not an H100 SXM). Devices without bf16 tensor cores (V100, T4) are absent: no MFU.
PEAK_BF16_TFLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.4),
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.4),
    (r"\bGH200\b", 989.4),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.1),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G\b", 70.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX 4090\b", 165.2),
    (r"\bRTX 3090\b", 71.0),
)


def peak_tflops_for(device_name: str) -> Optional[float]:
    """Dense bf16 TFLOP/s of a device by its CUDA name, or None when kiln does not know it."""
    import re

    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def peak_flops(device: torch.device, override_tflops: Optional[float]) -> Optional[float]:
    """Peak FLOP/s of one device for MFU; None when unknown (e.g. CPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        tflops = peak_tflops_for(torch.cuda.get_device_name(device))
        return tflops * 1e12 if tflops else None
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class MetricsLogger:
    def __init__(self, cfg, run_dir: str, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.run_dir = run_dir
        self.jsonl = None
        self.wandb = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        lc = cfg.logger
        if lc.jsonl:
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if lc.wandb.enabled and lc.wandb.mode != "disabled":
            import wandb
            from omegaconf import OmegaConf

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=lc.wandb.project, entity=lc.wandb.entity, mode=lc.wandb.mode,
                                    dir=run_dir, name=cfg.run_name, resume="allow",
                                    id=_stable_run_id(run_dir),
                                    config=OmegaConf.to_container(cfg, resolve=True))
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        show_bar = lc.progress_bar if lc.progress_bar is not None else sys.stdout.isatty()
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **metrics}
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        line = f"[{kind}] step {step} " + " ".join(_fmt(k, v) for k, v in metrics.items())
        if self.bar:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1, loss: Optional[float] = None) -> None:
        if self.bar:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()


def _stable_run_id(run_dir: str) -> str:
    """One wandb run per run directory, so a resumed (or requeued) job appends to it."""
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]


def _fmt(k: str, v) -> str:
    if isinstance(v, float):
        if k in ("lr",):
            return f"{k}={v:.2e}"
        if k in ("tokens_per_s", "tokens"):
            return f"{k}={v:,.0f}"
        return f"{k}={v:.4g}"
    return f"{k}={v}"


def plot_losses(metrics_path: str, out_png: str, title: str = "kiln") -> Optional[str]:
    """Train and validation loss against step, from metrics.jsonl (last record per step wins)."""
    if not os.path.exists(metrics_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_losses(metrics_path)
    if not series["train"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for kind, label, style in (("train", "train loss", "-"), ("eval", "validation loss", "o-")):
        pts = sorted(series[kind].items())
        if pts:  # a lone point needs a marker: a line through one point draws nothing
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style if len(pts) > 1 else "o", label=label,
                    markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _read_losses(metrics_path: str) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
    with open(metrics_path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("kind") == "train" and "loss" in r:
                series["train"][r["step"]] = r["loss"]
            elif r.get("kind") == "eval" and "val_loss" in r:
                series["eval"][r["step"]] = r["val_loss"]
    return series


def plot_runs(runs: list[tuple], out_png: str, title: str = "kiln") -> Optional[str]:
    """Several runs' train/validation losses on one time axis: each run's steps continue after
    the previous run's last step (pretraining, then fine-tuning from its checkpoint). A run
    given as (label, path, "example") has a per-example loss (classification): it gets its
    own y axis on the right instead of being flattened under the language-model curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    right = None
    offset, drawn = 0, 0
    for label, path, *unit in runs:
        if not os.path.exists(path):
            continue
        series = _read_losses(path)
        if not series["train"]:
            continue
        per_example = unit == ["example"]
        if per_example and right is None:
            right = ax.twinx()
            right.set_ylabel("classification loss (nats/example)")
        target = right if per_example else ax
        for kind, style in (("train", "-"), ("eval", "o--")):
            pts = sorted(series[kind].items())
            if pts:
                target.plot([offset + s for s, _ in pts], [v for _, v in pts], style if len(pts) > 1 else "o",
                            markersize=3, color=f"C{2 * drawn + (kind == 'eval')}",
                            label=f"{label}: {'train' if kind == 'train' else 'validation'} loss")
        if len(runs) > 1:
            ax.axvline(offset, color="grey", alpha=0.3)
        offset += max(series["train"])
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step (runs laid end to end)")
    ax.set_ylabel("language-model loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
