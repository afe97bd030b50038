"""Started by tests/test_backend_optimizers.py as one plain process that states itself rank 0 of
1 (RANK, WORLD_SIZE, MASTER_*): it sets up every backend in turn on the same tiny model,
as the trainer does (ZeRO-3 and FSDP build it deferred), and writes to the JSON file named
first on its command line, per backend:

* ``groups``: the parameter names in each of the optimizer's weight-decay groups, read back
  from what the optimizer (DeepSpeed's ZeRO wrapper included) actually holds;
* ``losses``: three training steps on a fixed batch, with the weight decay given;
* ``norm_type``, ``norm``: the type and value of what the last ``backend.step`` returned;
* for DeepSpeed runs, the dtypes its engine reduces and accumulates gradients in.

Under ZeRO-3 every parameter is an empty 1-D partition even on one rank, so one process
shows what the groups are on many."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from model.llama import ModelConfig, Transformer  # noqa: E402
from tests.conftest import TINY, compose  # noqa: E402
from train.backends import build_backend  # noqa: E402

BATCH = (4, 33)  # inputs and next-token targets of 32 positions


def optimizer_groups(b) -> list[tuple[float, list[str]]]:
    """(weight decay, parameter names) of each group the optimizer steps with. DeepSpeed's
    ZeRO wrappers keep the original parameters per group (stage 1/2: ``bit16_groups``,
    stage 3: ``fp16_groups``) beside their inner optimizer's flat partitions; it drops
    empty groups, so the list may be shorter than the two kiln asked for."""
    names = {id(p): n for n, p in b.raw_model.named_parameters()}
    opt = b.optimizer
    inner = getattr(opt, "optimizer", None)
    if inner is not None and b.name == "deepspeed":
        per_group = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None) or opt.fp16_groups
        return [(g["weight_decay"], sorted(names[id(p)] for p in params))
                for g, params in zip(inner.param_groups, per_group)]
    return [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups]


def train(b, steps: int = 3) -> tuple[list[float], object]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, b.raw_model.cfg.vocab_size, BATCH, generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=b.bf16)  # as the trainer's
    losses, norm = [], None
    for _ in range(steps):
        with b.micro_step_context(True):
            with autocast:
                _, loss = b.model(x, y)
            b.backward(loss)
        norm = b.step(1e-2, float(b.cfg.optim.grad_clip))
        losses.append(float(loss.detach()))
    return losses, norm


def probe(overrides: list[str]) -> tuple[dict, object]:
    cfg = compose(TINY + ["model.vocab_size=128", *overrides])
    b = build_backend(cfg)
    torch.manual_seed(cfg.train.seed)  # as the trainer does before building the model
    with b.model_init_context():
        model = Transformer(ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True)),
                            init_weights=not b.builds_deferred)
    b.setup(model)
    out = {"groups": optimizer_groups(b)}
    if b.name == "deepspeed":
        engine = b.engine
        out["comm_dtype"] = str(engine.communication_data_type)
        out["accum_dtype"] = str(engine.get_data_types()[1])
        out["optimizer"] = type(b.optimizer).__name__
    out["losses"], norm = train(b)
    out["norm_type"], out["norm"] = type(norm).__name__, float(norm)
    return out, b


def main() -> None:
    out_path, runs = sys.argv[1], json.loads(sys.argv[2])
    results, last_ds = {}, None
    for name, overrides in runs.items():
        results[name], b = probe(overrides)
        if b.name == "deepspeed":
            last_ds = b
    with open(out_path, "w") as f:
        json.dump(results, f)
    if last_ds is not None:
        last_ds.shutdown()  # also removes DeepSpeed's shared-memory segment


if __name__ == "__main__":
    main()
