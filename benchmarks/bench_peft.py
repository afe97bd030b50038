"""Full fine-tuning vs LoRA vs QLoRA vs prompt tuning on kiln's shipped fine-tuning tasks.

    python benchmarks/bench_peft.py [--out runs/bench_peft] [--pretrain-steps 200] [--cls-steps 60]
                                    [--qa-steps 60] [--methods full,lora,qlora,prompt] [--base <run dir>]

Pretrains the default tiny base (``launch/pretrain.py``, the embedded sample data) unless
``--base`` names one, then fine-tunes it with each method, each run in its own process
(``launch/sft.py``), on

- the classification task (``conf/sft_classify.yaml``: keep/drop of pipeline documents):
  held-out accuracy and macro-F1;
- the Q&A task (``conf/sft.yaml``: Python documentation questions): held-out loss.

For every run: share of parameters trained, peak memory of the process (``mem_gb`` of the
train records: peak RSS on a CPU, peak allocated on a GPU), checkpoint size (the last step
directory: trained weights plus their AdamW moments) and the median time per step. For the
tiny model on a CPU the peak RSS is reached at start-up and is the same for every method,
so each method also gets the memory that depends on it: the weights as held (4-bit where
QLoRA quantizes) plus fp32 gradients and AdamW moments of the trained parameters
(``model_state_mb``, computed on the real model set up as the method sets it up). Prints
a Markdown table (the README's) and writes it with the raw numbers to <out>/table.md and
<out>/results.json.

Learning rates: full fine-tuning uses the presets' (3e-4 classification, 5e-4 Q&A); LoRA
and QLoRA (rank 8, alpha 16, every projection) 2e-3; prompt tuning (20 virtual tokens from
the vocabulary) 3e-2. Prompt tuning needs unpacked rows (sft.packing=false) on the Q&A task.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {
    "full": [],
    "lora": ["lora.enabled=true", "lora.rank=8", "lora.alpha=16", "optim.lr=2e-3"],
    "qlora": ["lora.enabled=true", "lora.rank=8", "lora.alpha=16", "optim.lr=2e-3", "lora.quantize=4bit"],
    "prompt": ["prompt_tuning.enabled=true", "prompt_tuning.n_tokens=20", "optim.lr=3e-2"],
}
TASKS = {  # config name, extra overrides per method
    "classification": ("sft_classify", {}),
    "qa": ("sft", {"prompt": ["sft.packing=false"]}),
}


def run(cmd: list[str], log: str) -> float:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(path) for n in files)


def measure(run_dir: str, task: str) -> dict:
    recs = records(run_dir)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    first_run = next(r for r in recs if r["kind"] == "run")
    steps = [(b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(train, train[1:])
             if b["step"] == a["step"] + 1 and b.get("tokens_per_s")]
    ckpts = sorted(d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("step_"))
    out = {"trainable_share": first_run["trainable_share"], "trainable_parameters": first_run["trainable_parameters"],
           "peak_mem_gb": max(r["mem_gb"] for r in train), "s_per_step": statistics.median(steps) if steps else None,
           "checkpoint_mb": dir_bytes(os.path.join(run_dir, "checkpoints", ckpts[-1])) / 2**20,
           "final_step": train[-1]["step"]}
    if task == "classification":
        with open(os.path.join(run_dir, "classification_metrics.json")) as f:
            m = json.load(f)
        out.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"])
    else:
        out["val_loss"] = evals[-1]["val_loss"] if evals else None
    return out


def model_state_mb(method: str, base: str) -> float:
    """Weights as held + gradients and AdamW moments (fp32) of the trained parameters, for the
    base's model set up as ``method`` sets it up (the Q&A task's LM): the training memory that
    depends on the method, without activations."""
    sys.path.insert(0, REPO)
    from model.llama import Transformer
    from model.lora import add_lora, quantize_base_4bit, train_only
    from model.prompt_tuning import add_prompt_tuning, train_only_prompt
    from model.quant import weight_memory
    from train import checkpoint as ckpt

    model = Transformer(ckpt.read_model_config(ckpt.resolve(base)))
    if method in ("lora", "qlora"):
        add_lora(model, "default", 8, 16.0)
        train_only(model, "default")
        if method == "qlora":
            quantize_base_4bit(model)
    elif method == "prompt":
        add_prompt_tuning(model, 20)
        train_only_prompt(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (weight_memory(model)["held"] + 12 * trained) / 2**20


def table(results: dict) -> str:
    lines = ["| method | trained params | classification accuracy | macro-F1 | Q&A held-out loss | "
             "weights + grads + AdamW (MB) | peak RSS (GB, cls / Q&A) | checkpoint (MB, cls / Q&A) | "
             "s/step (cls / Q&A) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in results.items():
        c, q = r.get("classification", {}), r.get("qa", {})

        def both(key, fmt, c=c, q=q):
            return " / ".join(fmt.format(x[key]) if x.get(key) is not None else "-" for x in (c, q))

        share = c.get("trainable_share", q.get("trainable_share"))
        lines.append(f"| {m} | {share:.3%} | {c.get('accuracy', float('nan')):.3f} | "
                     f"{c.get('macro_f1', float('nan')):.3f} | {q.get('val_loss', float('nan')):.3f} | "
                     f"{r.get('model_state_mb', float('nan')):.2f} | {both('peak_mem_gb', '{:.2f}')} | {both('checkpoint_mb', '{:.2f}')} | "
                     f"{both('s_per_step', '{:.3f}')} |")
    return "\n".join(lines)


def weight_memory_rows(models: list[str]) -> str:
    """The model weights' memory for each ``conf/model/<name>.yaml``: fp32, bf16, and QLoRA's
    (NF4 + double quantization on every LoRA target, the rest fp32 as kiln holds it)."""
    sys.path.insert(0, REPO)
    import torch
    import yaml

    from model.llama import ModelConfig, Transformer
    from model.lora import add_lora, quantize_base_4bit
    from model.quant import weight_memory

    lines = ["| model | parameters | fp32 (MiB) | bf16 (MiB) | QLoRA base: NF4 targets + fp32 rest (MiB) |",
             "| --- | --- | --- | --- | --- |"]
    for name in models:
        with open(os.path.join(REPO, "conf", "model", f"{name}.yaml")) as f:
            spec = yaml.safe_load(f)
        mc = ModelConfig(**{k: v for k, v in spec.items() if k in ModelConfig.__dataclass_fields__}, vocab_size=32000)
        torch.manual_seed(0)
        model = Transformer(mc)
        n, dense = sum(p.numel() for p in model.parameters()), weight_memory(model)  # before any adapter
        add_lora(model, "x", 1, 1.0)  # marks the targets QLoRA quantizes; its own weights are subtracted below
        quantize_base_4bit(model)
        held = weight_memory(model)["held"] - 4 * sum(p.numel() for n_, p in model.named_parameters() if ".lora_" in n_)
        lines.append(f"| {name} | {n / 1e6:.1f}M | {dense['fp32'] / 2**20:.1f} | {dense['bf16'] / 2**20:.1f} | "
                     f"{held / 2**20:.1f} |")
        del model
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_peft")
    p.add_argument("--base", default=None, help="a pretrained kiln run to fine-tune (default: pretrain one)")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--cls-steps", type=int, default=60)
    p.add_argument("--qa-steps", type=int, default=60)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--table-from", default=None, help="rebuild the table from a results.json (no training)")
    p.add_argument("--memory-models", default="tiny,125m",
                   help="conf/model names whose weight memory (fp32 / bf16 / QLoRA) is printed first; empty: none")
    a = p.parse_args()
    if a.memory_models:
        print(weight_memory_rows(a.memory_models.split(",")), flush=True)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    if a.table_from:
        with open(a.table_from) as f:
            results = json.load(f)
        base = a.base or os.path.join(os.path.dirname(os.path.abspath(a.table_from)), "base")
        for m in results:
            results[m]["model_state_mb"] = model_state_mb(m, base)
        print(table(results))
        return 0
    base = a.base
    if base is None:
        base = os.path.join(out, "base")
        if not os.path.isdir(os.path.join(base, "checkpoints")):
            s = run([sys.executable, "launch/pretrain.py", f"run_dir={base}", f"train.max_steps={a.pretrain_steps}",
                     f"checkpoint.every={a.pretrain_steps}", "logger.plot=false"], os.path.join(out, "base.log"))
            print(f"pretrained the base in {s:.0f} s: {base}", flush=True)
    results: dict = {}
    for m in a.methods.split(","):
        for task in a.tasks.split(","):
            config, extra = TASKS[task]
            steps = a.cls_steps if task == "classification" else a.qa_steps
            run_dir = os.path.join(out, f"{m}-{task}")
            cmd = [sys.executable, "launch/sft.py", "--config-name", config, f"init_from={base}", f"run_dir={run_dir}",
                   "resume=none", f"train.max_steps={steps}", f"train.eval_every={steps}", f"checkpoint.every={steps}",
                   "train.log_every=1", "logger.plot=false", "eval.prompts=[]", *METHODS[m], *extra.get(m, [])]
            s = run(cmd, os.path.join(out, f"{m}-{task}.log"))
            results.setdefault(m, {})[task] = {**measure(run_dir, task), "wall_s": s}
            print(f"{m} {task}: {json.dumps(results[m][task])}", flush=True)
        results[m]["model_state_mb"] = model_state_mb(m, base)
    text = table(results)
    print(text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
