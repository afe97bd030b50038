"""Generate text from a kiln checkpoint or a Hugging Face Llama directory.

    python launch/generate.py <checkpoint or hf dir> [prompts.txt ...] --prompt "Once upon a time"
        [--max-new-tokens 64] [--temperature 0.8] [--top-k 40] [--top-p 1.0] [--seed 0]
        [--batch-size 8] [--use-cache|--no-use-cache] [--device auto] [--format text|jsonl]
        [--out results.jsonl] [--chat] [--system ...]

Prompts come from ``--prompt`` and/or files (one prompt per line; a ``.jsonl`` file holds
objects with a "prompt" key). They are generated in left-padded batches with a KV cache;
``--temperature 0`` is greedy. A row stops at EOS or at ``<|end_of_turn|>``; the stop token is
not part of the printed completion. With a fixed ``--seed`` a run is reproducible; a
prompt's sampled completion depends on the batch it is in (one random stream per batch),
greedy ones do not.

An adapter checkpoint (a LoRA run) is generated from as its base plus the adapter; the base
must still be the checkpoint the adapter was trained on (its digest equals adapter_config.json's
``base_digest``), else the command ends with exit status 3 naming both digests.

``--chat`` wraps every prompt as a user turn of kiln's chat template (optionally after a
``--system`` turn) and asks for the assistant's reply: exactly the ids fine-tuning trained on
(``train/sft/chat.py``), and the same string the exported ``chat_template.jinja`` renders.
"""

import _bootstrap  # noqa: F401, I001  (sys.path first: the imports below need it)

import json
import os
import sys

import torch

from _common import load_model_and_tokenizer, options_parser, pick_device
from model.llama import generate
from train.checkpoint import CheckpointError

OPTIONS = {"prompt": "", "max_new_tokens": 64, "temperature": 0.8, "top_k": 40, "top_p": 1.0, "seed": 0,
           "batch_size": 8, "use_cache": True, "device": "auto", "format": "text", "out": "",
           "chat": False, "system": ""}
HELP = {"prompt": "a prompt (added before the prompts of the files)",
        "max_new_tokens": "tokens generated per prompt at most",
        "temperature": "sampling temperature; 0 is greedy",
        "top_k": "sample among the k most likely tokens; 0: all",
        "top_p": "nucleus sampling: the smallest set of tokens with this probability",
        "seed": "seed of the sampling generator",
        "batch_size": "prompts generated together (left-padded)",
        "use_cache": "generate with a KV cache",
        "device": "auto (cuda when available), cpu, cuda, cuda:N",
        "format": "text: prompt and completion; jsonl: one JSON object per prompt",
        "out": "also write the results to this JSONL file",
        "chat": "wrap each prompt as a user turn of kiln's chat template",
        "system": "with --chat: a system turn before each prompt"}


def parser():
    """The command line: the model, prompt files, and a flag per entry of OPTIONS."""
    p = options_parser(__doc__, OPTIONS, HELP, choices={"format": ["text", "jsonl"]})
    p.add_argument("path", help="a kiln run, checkpoints or step directory, or a Hugging Face Llama directory")
    p.add_argument("prompt_files", nargs="*", metavar="prompts.txt",
                   help="files of prompts: one per line, or a .jsonl file of objects with a 'prompt' key")
    return p


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["prompt"] for line in f if line.strip()]
        return [line.rstrip("\n") for line in f if line.strip()]


def chat_text(prompt: str, system: str | None) -> str:
    """The chat-template rendering of one user prompt, ending with the assistant tag."""
    from train.sft.chat import render_text

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return render_text(messages, add_generation_prompt=True)


def run(path: str, prompts: list[str], opts: dict) -> list[dict]:
    device = pick_device(opts["device"])
    model, tok, _ = load_model_and_tokenizer(path, device)
    from model.prompt_tuning import prompt_embedding, with_virtual_ids

    n_virtual = prompt_embedding(model).n_tokens if prompt_embedding(model) is not None else 0
    max_len = model.cfg.max_seq_len - n_virtual  # a prompt-tuned model reads its virtual tokens first
    g = torch.Generator(device=device).manual_seed(opts["seed"])
    results = []
    for start in range(0, len(prompts), opts["batch_size"]):
        chunk = prompts[start:start + opts["batch_size"]]
        ids = []
        for p in chunk:
            if opts["chat"]:
                p = chat_text(p, opts["system"])
            t = tok.encode(p) or [tok.eos_id]  # an empty prompt starts a fresh document
            if len(t) >= max_len:
                print(f"[generate] prompt of {len(t)} tokens cut to its last {max_len - 1}", file=sys.stderr)
                t = t[-(max_len - 1):]
            ids.append(t)
        if n_virtual:
            ids = with_virtual_ids(model, ids)
        out = generate(model, ids, opts["max_new_tokens"], temperature=opts["temperature"],
                       top_k=opts["top_k"] or None, top_p=opts["top_p"], eos_id=tok.stop_ids,
                       use_cache=opts["use_cache"], generator=g)
        for p, row in zip(chunk, out.tolist()):
            stop = next((i for i, t in enumerate(row) if t in tok.stop_ids), None)
            new = row if stop is None else row[:stop]
            results.append({"prompt": p, "completion": tok.decode(new), "tokens": new,
                            "stopped": stop is not None})
    return results


@_bootstrap.exit_on_checkpoint_error
def main(argv=None) -> int:
    p = parser()
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    opts = vars(args)
    prompts = [opts["prompt"]] if opts["prompt"] else []
    for f in args.prompt_files:
        if not os.path.isfile(f):  # key=value was the old style: say that options are flags now
            p.error(f"prompts file {f!r} not found" + (" (options are --flags: --key value)" if "=" in f else ""))
        prompts += read_prompts(f)
    if not prompts:
        print("generate: no prompt given (--prompt ... or a prompts file)", file=sys.stderr)
        return 2
    try:
        results = run(args.path, prompts, opts)
    except CheckpointError:
        raise  # exit status 3 with its message: a checkpoint that cannot be read, an adapter's changed base
    except (FileNotFoundError, ValueError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    for i, r in enumerate(results):
        if opts["format"] == "jsonl":
            print(json.dumps(r, ensure_ascii=False))
        else:
            if opts["chat"]:  # the reply alone, under its prompt
                print(f"--- [{i}] user: {r['prompt']}\nassistant: {r['completion']}")
            else:
                print(f"--- [{i}] {r['prompt']!r}\n{r['prompt']}{r['completion']}")
    if opts["out"]:
        with open(opts["out"], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
