"""Started by tests/test_compile_graphs.py as one plain process that states itself rank 0 of
1: for each backend named on its command line it builds the tiny model as the trainer does
(deferred where the backend shards), compiles it with ``train.compile=true``'s
``compile_blocks``, sets the backend up and trains three steps, then writes to the JSON file
named first the number of graphs dynamo compiled, its graph breaks (with their reasons) and
the losses. Dynamo is reset between backends so each count is the backend's own."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from model.llama import ModelConfig, Transformer  # noqa: E402
from tests.backend_optimizers_probe import train  # noqa: E402
from tests.conftest import TINY, compose  # noqa: E402
from train.backends import build_backend  # noqa: E402
from train.compile import compile_blocks  # noqa: E402


def probe(overrides: list[str], compile_: bool) -> tuple[dict, object]:
    cfg = compose(TINY + ["model.vocab_size=128", f"train.compile={str(compile_).lower()}", *overrides])
    b = build_backend(cfg)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(cfg.train.seed)
    with b.model_init_context():
        model = Transformer(ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True)),
                            init_weights=not b.builds_deferred)
    if compile_:
        compile_blocks(model, b.compile_outside_hooks)
    b.setup(model)
    losses, _ = train(b)
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values())),
            "reasons": [r.split("\n")[0] for r in counters["graph_break"]],
            "losses": losses}, b


def main() -> None:
    out_path, runs = sys.argv[1], json.loads(sys.argv[2])
    results, last_ds = {}, None
    for name, (overrides, compile_) in runs.items():
        results[name], b = probe(overrides, compile_)
        if b.name == "deepspeed":
            last_ds = b
    with open(out_path, "w") as f:
        json.dump(results, f)
    if last_ds is not None:
        last_ds.shutdown()


if __name__ == "__main__":
    main()
