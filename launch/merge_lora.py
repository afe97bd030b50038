"""Merge a LoRA adapter checkpoint into its base weights: a plain kiln checkpoint directory.

    python launch/merge_lora.py <adapter checkpoint: step dir, checkpoints root or run dir> <out dir> [--accept-base]
    python launch/merge_lora.py --blend <adapter checkpoint>=<weight> [<adapter checkpoint>=<weight> ...] <out dir>
    python launch/export_hf.py <out dir> <hf dir>      # then export it like any checkpoint

The base is the ``init_from`` checkpoint recorded in the adapter's adapter_config.json, in
any backend's format; the chat template and tokenizer are carried over. It must still be the
checkpoint the adapter was trained on: its digest (``train.sft.adapters.init_digest``) must
equal the ``base_digest`` recorded there. A base retrained or replaced at that path since,
or an adapter_config.json without ``base_digest`` (written before kiln recorded it), ends
the command with exit status 3 and a message naming both digests and paths.
``--accept-base`` merges onto the current base anyway (with a warning): for a base known to
hold the same weights.

``--blend`` merges a weighted blend of adapters trained on the same base: base +
sum_i weight_i * delta_i (``model/adapter_mix.py``; weights need not sum to 1).
"""

import _bootstrap  # noqa: F401, I001  (sys.path first: the imports below need it)

import sys

from train.checkpoint import CheckpointError
from train.sft.adapters import merge_blend, merge_checkpoint


@_bootstrap.exit_on_checkpoint_error
def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    accept_base = "--accept-base" in args
    args = [a for a in args if a != "--accept-base"]
    blend = "--blend" in args
    args = [a for a in args if a != "--blend"]
    pairs = [a.rpartition("=") for a in args[:-1]] if blend else []
    bad = [a for a, (_, eq, w) in zip(args, pairs) if not eq or not _is_float(w)]
    if (len(args) < 2 if blend else len(args) != 2) or bad or any(a.startswith("--") for a in args):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if blend:
            out = merge_blend({p: float(w) for p, _, w in pairs}, args[-1], accept_base=accept_base)
        else:
            out = merge_checkpoint(args[0], args[1], accept_base=accept_base)
    except CheckpointError:
        raise  # exit status 3 with its message (a missing checkpoint included)
    except (FileNotFoundError, ValueError) as e:
        print(f"merge_lora: {e}", file=sys.stderr)
        return 2
    print(f"[kiln] merged checkpoint: {out}")
    return 0


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
