"""Started by tests/test_sharded_init.py under torchrun or deepspeed: builds a Trainer from
the overrides given, then rank 0 writes what the backend holds next to what one process
would start from (a fresh init with the same seed, or the ``init_from`` checkpoint)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.llama import Transformer  # noqa: E402
from tests.conftest import compose  # noqa: E402
from train.checkpoint.full_state import load_model, named_params  # noqa: E402
from train.tasks.pretrain import PretrainTask  # noqa: E402
from train.trainer import Trainer  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
out_path, overrides = args[0], args[1:]
built = {}
original = PretrainTask.build_model


def recording_build_model(self):
    model = original(self)
    params = list(model.parameters())
    built["meta"] = all(p.is_meta for p in params)
    built["partitioned"] = all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params)
    return model


PretrainTask.build_model = recording_build_model
cfg = compose(overrides)
trainer = Trainer(cfg)
got = trainer.backend.export_full().model
if trainer.backend.is_main:
    torch.manual_seed(cfg.train.seed)
    fresh_model = Transformer(trainer.model_cfg)
    names, _ = named_params(fresh_model)  # tied aliases once
    fresh = fresh_model.state_dict()
    want = load_model(str(cfg.init_from))[0].state_dict() if cfg.init_from else fresh
    diffs = {n: float((got[n].float() - want[n].float()).abs().max()) for n in names}
    from_fresh = max(float((got[n].float() - fresh[n].float()).abs().max()) for n in names)
    with open(out_path, "w") as f:
        json.dump({"built": built, "max_abs_diff": diffs, "max_abs_diff_from_fresh_init": from_fresh}, f)
trainer.backend.shutdown()
