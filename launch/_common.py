"""Shared by the inference launchers (generate, evaluate): their argparse options and loading a
model with its tokenizer from a kiln checkpoint or a Hugging Face directory.

kiln's SentencePiece ``Tokenizer`` is used whenever the directory has ``tokenizer.model``
(every kiln checkpoint and every kiln export does). An HF directory without one (Llama 3,
say) falls back to its ``transformers`` tokenizer, which is enough for inference; training
on such a model is refused by the trainer instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from model.hf_interop import (
    END_OF_TURN,
    SPM_FILE,
    is_hf_dir,
    load_hf_llama,
)
from model.llama import Transformer
from train.checkpoint.full_state import load_model


def options_parser(doc: str, options: dict[str, object], helps: dict[str, str],
                   choices: dict[str, list[str]] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag-name`` per entry of ``options`` (name -> default),
    typed like its default (a bool gets ``--x/--no-x``): the tools' one argument style, so a
    mistyped or unknown flag exits with status 2 and argparse's message naming it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --max-doc is a typo, not --max-docs
    for name, default in options.items():
        flag, help_ = "--" + name.replace("_", "-"), f"{helps[name]} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_)
        else:
            parser.add_argument(flag, dest=name, default=default, type=type(default), help=help_,
                                choices=(choices or {}).get(name))
    return parser


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TextTokenizer:
    """The few things inference needs from a tokenizer, whatever its library."""

    encode: object  # str -> list[int]
    decode: object  # list[int] -> str
    stop_ids: list[int]  # EOS and, when the vocabulary has it, the end-of-turn token
    eos_id: int
    pad_id: int


def _kiln_tokenizer(path: str) -> TextTokenizer:
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(path)
    stop = [tok.eos_id] + ([tok.control[END_OF_TURN]] if END_OF_TURN in tok.control else [])
    return TextTokenizer(tok.encode, tok.decode, stop, tok.eos_id, max(tok.pad_id, 0))


def _transformers_tokenizer(directory: str) -> TextTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.eos_token_id is None:
        raise ValueError(f"{directory}: the tokenizer defines no eos_token")
    stop = [tok.eos_token_id]
    eot = tok.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in tok.get_vocab() else None
    if eot is not None:
        stop.append(eot)
    return TextTokenizer(lambda s: tok.encode(s, add_special_tokens=True),
                         lambda ids: tok.decode(ids, skip_special_tokens=False), stop, tok.eos_token_id,
                         tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def load_model_and_tokenizer(path: str, device: torch.device) -> tuple[Transformer, TextTokenizer, str]:
    """(model in eval mode on ``device``, tokenizer, resolved directory). An adapter checkpoint
    is its base with the adapter on top (a prompt-tuning one: with its virtual-token table,
    which the caller puts in front of each prompt with ``model.prompt_tuning.with_virtual_ids``);
    a base whose digest is not the ``base_digest`` the adapter recorded (or no recorded digest)
    raises CheckpointError (``adapters.check_base``)."""
    path = path.removeprefix("hf:")
    if is_hf_dir(path):
        cfg, state = load_hf_llama(path)
        model = Transformer(cfg)
        model.load_state_dict(state, strict=True)
        spm = os.path.join(path, SPM_FILE)
        tok = _kiln_tokenizer(spm) if os.path.isfile(spm) else _transformers_tokenizer(path)
        return model.to(device).eval(), tok, path
    from train import checkpoint as ckpt

    step_dir = ckpt.resolve(path)
    from train.checkpoint.layout import PROMPT_TUNING_CONFIG

    if os.path.lexists(os.path.join(step_dir, PROMPT_TUNING_CONFIG)):  # a prompt-tuning run: base plus the table
        from train.sft.adapters import load_prompt_tuned

        print(f"[kiln] {step_dir} holds a prompt-tuning table: loading its base model with the virtual tokens "
              "(put in front of every prompt)", file=sys.stderr, flush=True)
        model = load_prompt_tuned(step_dir)  # CheckpointError unless the base's digest is the one recorded
        return model.to(device).eval(), _kiln_tokenizer(os.path.join(step_dir, SPM_FILE)), step_dir
    if os.path.isfile(os.path.join(step_dir, ckpt.ADAPTER_FILE)):  # a LoRA run: its base model plus the adapter
        from train.sft.adapters import add_adapter_from, adapter_config, load_base

        if adapter_config(step_dir).get("task") == "classification":
            raise ValueError(f"{step_dir} is a classification adapter: it scores texts, it does not generate")
        print(f"[kiln] {step_dir} holds a LoRA adapter: loading its base model "
              f"{adapter_config(step_dir).get('base')} with the adapter on top (launch/merge_lora.py writes "
              "them merged)", file=sys.stderr, flush=True)
        model = load_base(step_dir).to(device)  # CheckpointError unless the base's digest is the one recorded
        # On the device before the adapter: a QLoRA adapter's base is quantized to NF4 where it
        # lies, as training quantized it on the training device (train/tasks/finetune.py); the
        # CPU's and CUDA's bitsandbytes kernels need not round alike.
        add_adapter_from(model, step_dir)
        return model.eval(), _kiln_tokenizer(os.path.join(step_dir, SPM_FILE)), step_dir
    model, step_dir = load_model(step_dir, str(device), verify="off")  # resolve() above verified it
    return model, _kiln_tokenizer(os.path.join(step_dir, SPM_FILE)), step_dir
