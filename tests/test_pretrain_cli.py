"""The launch scripts, run as a user runs them (subprocess), on the bundled sample."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO, TINY


def launch(script, *args, timeout=600):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, f"launch/{script}", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_pretrain_cli_trains_checkpoints_logs_plots_and_samples(tmp_path, tokenizer_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("train.sample_tokens", "logger.plot"))]
    out = launch("pretrain.py", *overrides, f"run_dir={run_dir}", f"tokenizer.path={tokenizer_path}",
                 "train.max_steps=40", "train.eval_every=20", "checkpoint.every=20", "optim.lr=3e-3",
                 "train.sample_tokens=8", "logger.wandb.enabled=true", "logger.tensorboard=true")
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    vals = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    assert sorted(vals) == [0, 20, 40]
    assert vals[40] < vals[0] - 0.5  # learning, clearly (measured drop: 0.84 nats)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 40 and all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    assert (run_dir / "loss.png").stat().st_size > 10_000
    report = (run_dir / "data_report" / "report.md").read_text()  # every pipeline step with its counts
    for step in ("warc_reader", "html_extract", "langid", "gopher_quality", "c4_quality", "minhash_dedup"):
        assert f"| {step} |" in report
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_00000020", "step_00000040"]
    assert "[kiln] sample: The Python interpreter" in out
    assert "global batch = micro 4 x accum 1 x data-parallel 1 = 4 sequences" in out
    assert "[kiln] document mask: on (dense)" in out  # the default, on a CPU
    assert os.listdir(run_dir / "tensorboard")
    wandb_runs = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]
    assert len(wandb_runs) == 1


def test_train_tokenizer_cli_writes_a_usable_model(tmp_path):
    out_path = tmp_path / "tok.model"
    out = launch("train_tokenizer.py", "tokenizer.vocab_size=600", "tokenizer.train_max_docs=30",
                 f"tokenizer.output={out_path}", f"run_dir={tmp_path}")
    assert "600 pieces" in out
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(str(out_path))
    assert tok.decode(tok.encode("import os\nprint(1)")) == "import os\nprint(1)"
