"""Merge a LoRA adapter checkpoint into its base weights: a plain kiln checkpoint directory.

    python launch/merge_lora.py <adapter checkpoint: step dir, checkpoints root or run dir> <out dir>
    python launch/export_hf.py <out dir> <hf dir>      # then export it like any checkpoint

The base is the ``init_from`` checkpoint recorded in the adapter's adapter_config.json, in
any backend's format; the chat template and tokenizer are carried over.
"""

import _bootstrap  # noqa: F401, I001  (sys.path first: the imports below need it)

import sys

from train.sft.adapters import merge_checkpoint


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        out = merge_checkpoint(args[0], args[1])
    except (FileNotFoundError, ValueError) as e:
        print(f"merge_lora: {e}", file=sys.stderr)
        return 2
    print(f"[kiln] merged checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
