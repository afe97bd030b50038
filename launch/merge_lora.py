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
sum_i weight_i * delta_i (``model/adapter_mix.py``; weights need not sum to 1). A checkpoint
named twice, under any spelling, is refused rather than merged with one of its weights.
A command line that does not parse (an unknown flag, a ``--blend`` item that is not
``<adapter checkpoint>=<number>``) ends with exit status 2 and a message naming it.
"""

import _bootstrap  # noqa: F401, I001  (sys.path first: the imports below need it)

import math
import sys

from _common import options_parser
from train.checkpoint import CheckpointError
from train.sft.adapters import merge_blend, merge_checkpoint

OPTIONS = {"accept_base": False, "blend": False}
HELP = {"accept_base": "merge onto the adapter's base even if its digest is not the recorded base_digest",
        "blend": "the checkpoints are <adapter checkpoint>=<weight> items: merge their weighted blend"}


def parser():
    """The command line: the two flags of OPTIONS and the checkpoints, the output directory last."""
    p = options_parser(__doc__, OPTIONS, HELP)
    p.add_argument("paths", nargs="+", metavar="checkpoint",
                   help="<adapter checkpoint> <out dir>, or with --blend <adapter checkpoint>=<weight> ... <out dir>")
    return p


def blend_items(p, items: list[str]) -> list[tuple[str, float]]:
    """(checkpoint, weight) of each ``<checkpoint>=<weight>`` item, in order: a list, not a
    dict, so that a checkpoint given twice reaches merge_blend, which refuses it. A malformed
    item (no checkpoint, a weight that is not a finite number) is a usage error naming it."""
    pairs = []
    for item in items:
        path, _, weight = item.rpartition("=")
        try:
            w = float(weight)
        except ValueError:
            w = math.nan
        if not path or not math.isfinite(w):
            p.error(f"argument --blend: {item!r} is not <adapter checkpoint>=<weight> (a finite number)")
        pairs.append((path, w))
    return pairs


@_bootstrap.exit_on_checkpoint_error
def main(argv=None) -> int:
    p = parser()
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    *inputs, out_dir = args.paths
    if args.blend and not inputs:
        p.error("--blend needs at least one <adapter checkpoint>=<weight> before the output directory")
    if not args.blend and len(inputs) != 1:
        p.error(f"expected <adapter checkpoint> <out dir> (or --blend), got: {' '.join(args.paths)}")
    pairs = blend_items(p, inputs) if args.blend else []
    try:
        if args.blend:
            out = merge_blend(pairs, out_dir, accept_base=args.accept_base)
        else:
            out = merge_checkpoint(inputs[0], out_dir, accept_base=args.accept_base)
    except CheckpointError:
        raise  # exit status 3 with its message (a missing checkpoint included)
    except (FileNotFoundError, ValueError) as e:
        print(f"merge_lora: {e}", file=sys.stderr)
        return 2
    print(f"[kiln] merged checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
