"""Convert a kiln checkpoint between storage formats, offline.

  # one safetensors file of model weights (for export, inspection, init_from)
  python launch/convert_checkpoint.py runs/x/checkpoints/step_00001000 out/ --to weights
  # a portable checkpoint (full weights + AdamW moments) any backend resumes from
  python launch/convert_checkpoint.py runs/x --to full out/step_00001000
  # DeepSpeed ZeRO (any stage, any world size) -> FSDP (torch.distributed.checkpoint)
  python launch/convert_checkpoint.py runs/zero3 out/ --to fsdp
  # FSDP (or anything) -> a native DeepSpeed ZeRO checkpoint for N ranks
  python launch/convert_checkpoint.py runs/fsdp out/ --to deepspeed --zero-stage 3 --world-size 2

The input may be a step directory, a checkpoints root or a run directory (latest complete
checkpoint). The output is a complete kiln checkpoint directory (manifest, trainer state,
config, tokenizer), so ``resume=<out>`` continues training from it; ``--to weights``
writes only ``model.safetensors``. Every backend can also resume any format directly;
conversion is for moving a run to another system, sharing weights, or avoiding the
conversion cost at start-up.
"""

import _bootstrap  # noqa: F401

import argparse
import json
import os
import shutil
import sys
import tempfile

from model.llama import param_count
from train import checkpoint as ckpt
from train.checkpoint.convert import convert_to_deepspeed, finish, load_full, write_dcp
from train.checkpoint.full_state import FullState


@_bootstrap.exit_on_checkpoint_error
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="step dir, checkpoints root or run dir")
    ap.add_argument("out", help="output checkpoint directory (for --to weights: a directory for model.safetensors)")
    ap.add_argument("--to", choices=["weights", "full", "fsdp", "deepspeed"], required=True)
    ap.add_argument("--zero-stage", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--world-size", type=int, default=1)
    args = ap.parse_args(argv)

    src = ckpt.resolve(args.checkpoint)
    if not ckpt.is_complete(src):
        sys.exit(f"{src} is not a complete kiln checkpoint")
    print(f"[kiln] converting {src} ({ckpt.storage_format(src)}, backend {ckpt.read_meta(src).get('backend')}) "
          f"-> {args.to}", flush=True)
    if args.to == "weights":
        st, _ = load_full(src, with_optimizer=False)
        os.makedirs(args.out, exist_ok=True)
        FullState(model=st.model).save(args.out)
        ckpt.copy_carried(src, args.out, (ckpt.MODEL_CONFIG,))
        print(json.dumps({"out": os.path.join(os.path.abspath(args.out), ckpt.MODEL_FILE),
                          "parameters": param_count(ckpt.read_model_config(src))}))
        return
    if os.path.exists(args.out):  # before any work: a conversion never replaces a checkpoint
        print(f"convert_checkpoint: {args.out} exists; refusing to overwrite it (give another output "
              "directory, or remove it)", file=sys.stderr)
        sys.exit(2)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kiln-convert-", dir=parent)
    try:
        if args.to == "full":
            st, _ = load_full(src, with_optimizer=True)
            st.save(tmp)
            meta = {"backend": "single", "world_size": 1, "zero_stage": 0}
        elif args.to == "fsdp":
            st, _ = load_full(src, with_optimizer=True)
            write_dcp(st, tmp)
            meta = {"backend": "fsdp", "world_size": args.world_size, "zero_stage": 0}
        else:
            convert_to_deepspeed(src, tmp, args.zero_stage, args.world_size)
            meta = {"backend": "deepspeed", "world_size": args.world_size, "zero_stage": args.zero_stage}
        out = finish(src, tmp, args.out, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({"out": os.path.abspath(out), "format": ckpt.storage_format(out), **meta}))


if __name__ == "__main__":
    main()
