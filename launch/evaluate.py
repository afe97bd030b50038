"""Perplexity and bits-per-byte of a model on the held-out split of a dataset.

    python launch/evaluate.py <checkpoint or hf dir> [data=<conf/data name>] [data.<key>=<value> ...]
        [--seq-len N] [--batch-size 8] [--max-docs 0] [--device auto] [--out result.json]
        [--texts docs.jsonl] [--end-eos|--no-end-eos]

The data config is the checkpoint's own (its config.yaml), so by default the model is
evaluated on the validation documents it was held out from; ``data=<name>`` swaps in
``conf/data/<name>.yaml`` and ``data.<key>=...`` overrides single keys. These two are Hydra-style
config overrides, so they stay ``key=value`` words after the path; the tool's own options are
``--flags``. An HF directory has no run config and uses ``conf/data/sample.yaml`` unless told
otherwise.

A prompt-tuning checkpoint is scored with its virtual tokens in front of every window, as
its run trained and evaluated it (they predict nothing; a window is shorter by their number).

Every validation document is scored as the model saw documents in training: preceded by
EOS (the previous document's end) and followed by EOS, which is predicted too. A document
longer than ``--seq-len`` (default: the run's data.seq_len) is cut into consecutive windows,
each starting from the previous window's last token, so every token is scored exactly once.

    loss = total nats / predicted tokens        perplexity = exp(loss)
    bits_per_byte = total nats / ln 2 / UTF-8 bytes of the documents' text

Bits per byte does not depend on the tokenizer, so models with different vocabularies
compare. The result is printed as one JSON line and written to ``--out`` if given.

``--texts docs.jsonl`` scores the ``text`` field of each line of a JSONL file instead of a
held-out split (a bad line stops with its file and line number). ``--no-end-eos`` does not
predict the closing EOS: what lm-evaluation-harness's rolling log-likelihood measures with
``prefix_token_id`` set to EOS, so for documents that fit in one window the two programs'
bits per byte agree (tests/test_readme_commands.py compares them).
"""

import _bootstrap  # noqa: F401, I001  (sys.path first: the imports below need it)

import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from _common import load_model_and_tokenizer, options_parser, pick_device
from data_pipeline.config import DataConfig
from data_pipeline.pipeline import document_stream
from model.prompt_tuning import prepend, prompt_embedding
from train.checkpoint import CONFIG, read_yaml
from train.config import REPO_ROOT, register_configs

OPTIONS = {"seq_len": 0, "batch_size": 8, "max_docs": 0, "device": "auto", "out": "", "texts": "",
           "end_eos": True}
HELP = {"seq_len": "tokens per scored window; 0: the data config's seq_len (at most the model's context)",
        "batch_size": "windows scored together",
        "max_docs": "score at most this many documents; 0: all",
        "device": "auto (cuda when available), cpu, cuda, cuda:N",
        "out": "also write the JSON result to this file",
        "texts": "score the 'text' field of each line of this JSONL file instead of a held-out split",
        "end_eos": "predict the EOS closing each document (--no-end-eos: as lm-evaluation-harness's rolling "
                   "log-likelihood)"}


def parser():
    """Flags for the tool's options; the data config's overrides stay Hydra-style words."""
    p = options_parser(__doc__, OPTIONS, HELP)
    p.add_argument("path", help="a kiln run, checkpoints or step directory, or a Hugging Face Llama directory")
    p.add_argument("overrides", nargs="*", metavar="data=<group> | data.<key>=<value>",
                   help="Hydra-style overrides of the data config (config overrides, not tool flags): "
                        "data=<conf/data name> swaps the group, data.<key>=<value> sets one key")
    return p


def data_config(model_dir: str, overrides: list[str]):
    """The data config: the checkpoint's, a conf/data group (``data=name``), then dotted overrides."""
    register_configs()  # the ${asset:...} resolver of conf/data/*.yaml
    base = OmegaConf.structured(DataConfig)
    run_cfg = os.path.join(model_dir, CONFIG)
    group = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), None)
    if group is None and os.path.isfile(run_cfg):
        layers = [OmegaConf.create(read_yaml(run_cfg).get("data", {}))]  # untrusted: the safe reader
    else:
        layers = [OmegaConf.load(os.path.join(REPO_ROOT, "conf", "data", f"{group or 'sample'}.yaml"))]
    dotted = [o[len("data."):] for o in overrides if o.startswith("data.")]
    cfg = OmegaConf.merge(base, *layers, OmegaConf.from_dotlist(dotted))
    OmegaConf.resolve(cfg)
    return cfg


@torch.no_grad()
def score_texts(model, tok, texts, seq_len: int, batch_size: int, device, end_eos: bool = True) -> dict:
    """Sum of next-token nats over every document (see the module docstring)."""
    nats, tokens, nbytes, docs = 0.0, 0, 0, 0
    windows: list[list[int]] = []

    def flush():
        nonlocal nats, tokens
        if not windows:
            return
        width = max(len(w) for w in windows) - 1
        inp = torch.full((len(windows), width), tok.pad_id, dtype=torch.long)
        tgt = torch.full((len(windows), width), -100, dtype=torch.long)
        for i, w in enumerate(windows):
            inp[i, :len(w) - 1] = torch.tensor(w[:-1])
            tgt[i, :len(w) - 1] = torch.tensor(w[1:])
        inp, tgt = inp.to(device), tgt.to(device)
        if prompt_embedding(model) is not None:  # a prompt-tuned model reads its virtual tokens first
            inp, tgt, _ = prepend(model, inp, tgt)  # their positions predict nothing (-100)
        logits, _ = model(inp)  # causal: right padding cannot affect real positions
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                      reduction="sum"))
        tokens += int((tgt != -100).sum())
        windows.clear()

    for text in texts:
        ids = [tok.eos_id] + tok.encode(text) + ([tok.eos_id] if end_eos else [])
        docs += 1
        nbytes += len(text.encode("utf-8"))
        for j in range(0, len(ids) - 1, seq_len):
            windows.append(ids[j:j + seq_len + 1])
            if len(windows) == batch_size:
                flush()
    flush()
    loss = nats / max(tokens, 1)
    return {"docs": docs, "tokens": tokens, "bytes": nbytes, "nats": nats, "loss": loss,
            "perplexity": math.exp(min(loss, 700)), "bits_per_byte": nats / math.log(2) / max(nbytes, 1)}


def read_texts(path: str) -> list[str]:
    """The ``text`` of each line of a JSONL file; a malformed line is an error naming it."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{no}: not a JSON object with a 'text' field ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{no}: 'text' is {type(text).__name__}, not a string")
            texts.append(text)
    return texts


@_bootstrap.exit_on_checkpoint_error
def main(argv=None) -> int:
    p = parser()
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    for o in args.overrides:
        if not (o.startswith("data=") or (o.startswith("data.") and "=" in o)):
            p.error(f"argument {o!r} is not a data=<group> or data.<key>=<value> override")
    opts = vars(args)
    t0 = time.time()
    device = pick_device(opts["device"])
    try:
        model, tok, model_dir = load_model_and_tokenizer(args.path, device)
        cfg = data_config(model_dir, args.overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    table = prompt_embedding(model)
    seq_len = min(opts["seq_len"] or cfg.seq_len, model.cfg.max_seq_len - (table.n_tokens if table else 0))
    if opts["texts"]:
        try:
            texts = read_texts(opts["texts"])
        except (OSError, ValueError) as e:
            print(f"evaluate: {e}", file=sys.stderr)
            return 2
        source = {"data": os.path.abspath(opts["texts"]), "split": "all"}
    else:
        texts = (d.text for d in document_stream(cfg, split="val", loop=False))
        source = {"data": cfg.name, "split": "val"}
    texts = itertools.islice(texts, opts["max_docs"] or None)
    result = {"model": os.path.abspath(model_dir), **source, "seq_len": seq_len, "end_eos": opts["end_eos"],
              **score_texts(model, tok, texts, seq_len, opts["batch_size"], device, opts["end_eos"])}
    if result["docs"] == 0:
        where = opts["texts"] or f"the validation split of data {cfg.name!r} (data.val_fraction={cfg.val_fraction})"
        print(f"evaluate: {where} has no documents", file=sys.stderr)
        return 1
    result["seconds"] = round(time.time() - t0, 2)
    line = json.dumps(result)
    print(line)
    if opts["out"]:
        with open(opts["out"], "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
