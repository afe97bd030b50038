"""Export a kiln checkpoint as a Hugging Face transformers Llama directory.

    python launch/export_hf.py <checkpoint> <out dir> [--max-shard-size 5GB] [--dtype float32]
                               [--chat-template file.jinja]

<checkpoint> is a step directory, a checkpoints root or a run directory (the latest complete
step is used). The result loads with ``AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)``; see docs/hf_interop.md.

    python launch/export_hf.py <LoRA adapter checkpoint> <out dir> --peft

writes the adapter alone as a PEFT LoRA adapter directory (adapter_config.json,
adapter_model.safetensors) for ``PeftModel.from_pretrained(<the base's HF export>, out)``.
"""

import _bootstrap  # noqa: F401, I001  (sys.path first: the imports below need it)

import argparse
import json
import sys

from train.hf_export import export_hf


@_bootstrap.exit_on_checkpoint_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--dtype", default="float32", help="float32 (default, what kiln trains in) | bfloat16 | float16")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file; default: the checkpoint's chat_template.jinja, if any")
    p.add_argument("--peft", action="store_true",
                   help="<checkpoint> is a LoRA adapter checkpoint: write its adapter as a PEFT adapter directory")
    p.add_argument("--accept-base", action="store_true",
                   help="--peft: use the adapter's base even if its digest changed (as merge_lora.py)")
    a = p.parse_args(argv)
    if a.peft:
        from train.sft.adapters import export_peft

        try:
            summary = export_peft(a.checkpoint, a.out_dir, accept_base=a.accept_base)
        except (FileNotFoundError, ValueError) as e:
            print(f"export_hf: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary))
        return 0
    template = None
    if a.chat_template:
        with open(a.chat_template, encoding="utf-8") as f:
            template = f.read()
    try:
        summary = export_hf(a.checkpoint, a.out_dir, a.max_shard_size, a.dtype, template)
    except (FileNotFoundError, ValueError) as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
