"""What every fine-tuning task shares: it starts from the ``init_from`` checkpoint.

- tokenizer and architecture come from that checkpoint (the tokenizer travels with it as
  ``tokenizer.model``), from any backend and world size (``read_full_state``), or from an
  ``hf:`` directory;
- the network is the task's (``new_model``: the LM, a classifier, a reward model), built
  whole on every rank with the checkpoint's weights, optionally with a LoRA adapter (only the
  adapter, and a head, train);
- checkpoints: the usual full state, or for LoRA runs the adapter (+ head) and its AdamW
  moments only, gathered through the backend so ZeRO-3 never writes an empty adapter;
  plus ``adapter_config.json`` (with the base's path and digest);
- a before/after table of greedy generations for fixed prompts (``eval.prompts``,
  ``eval.report``) for the tasks that generate.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Optional

import torch

from data_pipeline.tokenizer import Tokenizer
from model.llama import ModelConfig, Transformer, generate
from model.lora import add_lora, quantize_base_4bit, train_only
from train import checkpoint as ckpt
from train.checkpoint import ADAPTER_CONFIG, ADAPTER_FILE, ADAPTER_OPTIM_FILE
from train.checkpoint.full_state import FullState, load_weights, read_adapter_state, read_init_weights
from train.checkpoint.writing import Writing
from train.errors import ConfigError
from train.log import logger
from train.metrics import plot_runs
from train.sft.chat import control_ids, encode_prompt
from train.tasks.base import Task
from train.tasks.pretrain import ensure_tokenizer, resolve_model_config


def init_step_dir(cfg) -> Optional[str]:
    """The step directory ``init_from`` names (None for ``hf:`` models)."""
    init = str(cfg.init_from)
    if init.startswith("hf:"):
        return None
    try:
        return ckpt.resolve(init, str(cfg.checkpoint.verify))  # the run's one verification of it
    except FileNotFoundError as e:
        raise ConfigError("init_from", f"{e}. Make the default one with `python launch/pretrain.py`") from None


class FinetuneTask(Task):
    """Base of the tasks that start from a checkpoint; subclasses give ``new_model``,
    ``load_data``, ``build_data`` and what they evaluate."""

    name = "finetune"
    uses_chat_template = False  # the tokenizer must hold the chat control tokens
    extra_trainable = ()  # parameter-name prefixes that train beside a LoRA adapter (a head)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lora = bool(cfg.lora.enabled)
        pt = cfg.get("prompt_tuning")
        self.prompt_tuning = bool(pt is not None and pt.enabled)
        self.partial = self.lora or self.prompt_tuning  # checkpoints hold the trained part only
        self.init_dir = init_step_dir(cfg)
        self._base_digest: Optional[str] = None

    # -- what is built --------------------------------------------------------------------
    def build_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if cfg.tokenizer.path:
            tok = Tokenizer(cfg.tokenizer.path)
        elif self.init_dir is None:
            tok = ensure_tokenizer(cfg, self.backend)  # hf: its tokenizer.model
        else:
            path = os.path.join(self.init_dir, ckpt.TOKENIZER)
            if not os.path.isfile(path):
                raise ConfigError("init_from", f"{self.init_dir} has no tokenizer.model; set tokenizer.path")
            tok = Tokenizer(path)
        if self.uses_chat_template:
            control_ids(tok)  # the chat template needs the reserved tokens
        return tok

    def build_model_config(self) -> ModelConfig:
        """The checkpoint's architecture (``model.dropout`` from this config); written back
        into cfg.model so the saved config.yaml describes the model really trained."""
        cfg, tok = self.cfg, self.trainer.tokenizer
        if self.init_dir is None:
            mc = resolve_model_config(cfg, tok)
        else:
            mc = ckpt.read_model_config(self.init_dir)
            mc.dropout = float(cfg.model.dropout)
        if cfg.data.seq_len > mc.max_seq_len:
            raise ConfigError("data.seq_len", f"{cfg.data.seq_len} exceeds the checkpoint's max_seq_len={mc.max_seq_len}")
        if self.prompt_tuning and cfg.prompt_tuning.n_tokens + cfg.data.seq_len > mc.max_seq_len:  # before any model
            raise ConfigError("prompt_tuning.n_tokens", f"{cfg.prompt_tuning.n_tokens} virtual tokens + data.seq_len="
                              f"{cfg.data.seq_len} exceed the checkpoint's max_seq_len={mc.max_seq_len}")
        if mc.vocab_size < tok.vocab_size:
            raise ConfigError("tokenizer.path", f"{tok.vocab_size} pieces but the checkpoint has "
                              f"{mc.vocab_size} embedding rows")
        for f in fields(ModelConfig):
            cfg.model[f.name] = getattr(mc, f.name)
        return mc

    def new_model(self, mc: ModelConfig) -> torch.nn.Module:
        """The network being fine-tuned, before its weights are loaded."""
        return Transformer(mc)

    def build_model(self) -> torch.nn.Module:
        cfg, mc = self.cfg, self.trainer.model_cfg
        model = self.new_model(mc)
        # Read (and, for a DeepSpeed checkpoint, converted) once on rank 0, streamed to the others.
        b, path = self.backend, str(cfg.init_from)
        src, mode = (self.init_dir, "off") if self.init_dir else (path, str(cfg.checkpoint.verify))  # verified once
        base = b.on_main(f"reading init_from={path}", lambda: FullState(model=read_init_weights(src, mc, mode)))
        load_weights(model, b.full_state_from_main(base).model, path)
        if self.lora:
            lo = cfg.lora
            add_lora(model, lo.name, lo.rank, lo.alpha, lo.dropout, list(lo.targets))
            train_only(model, lo.name, extra_prefixes=self.extra_trainable)
            if lo.quantize == "4bit":
                from model.quant import weight_memory
                from train.sft.config import QLORA_BACKENDS

                if not self.backend.holds_plain_modules:
                    raise ConfigError("lora.quantize", QLORA_BACKENDS)
                model = model.to(self.backend.device)
                n = quantize_base_4bit(model)
                mem = weight_memory(model)
                if self.backend.is_main:
                    logger().info(f"QLoRA: {n} base weights in NF4 (double quantization); model weights "
                                  f"{mem['held'] / 2**20:.2f} MiB held, {mem['bf16'] / 2**20:.2f} MiB in bf16, "
                                  f"{mem['fp32'] / 2**20:.2f} MiB in fp32")
        if self.prompt_tuning:
            self.add_prompt_tuning(model)
        return model

    def add_prompt_tuning(self, model: torch.nn.Module) -> None:
        """The virtual-token table (model/prompt_tuning.py), initialised from prompt_tuning.init_text's
        embeddings or vocabulary rows; everything but it (and a head) frozen."""
        from model.prompt_tuning import add_prompt_tuning, train_only_prompt

        pt = self.cfg.prompt_tuning
        ids = self.trainer.tokenizer.encode(str(pt.init_text)) if pt.init_text else None
        add_prompt_tuning(model, int(pt.n_tokens), init_ids=ids, seed=int(pt.seed))
        train_only_prompt(model, extra_prefixes=self.extra_trainable)

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, extra: dict):
        """Prompt tuning puts the virtual tokens before every example (``prompt_tuning.prepend``)."""
        if not self.prompt_tuning:
            return super().forward(model, x, y, extra)
        from model.classifier import TransformerClassifier
        from model.prompt_tuning import prepend

        raw = self.backend.raw_model
        x, y, extra = prepend(raw, x, y, isinstance(raw, TransformerClassifier), **extra)
        return model(x, y, **extra)

    # load_initial_weights: already done in build_model. LoRA adapters and a head are built
    # around the base weights, so every rank builds the whole model (no sharded initialisation).

    # -- checkpoints ------------------------------------------------------------------------
    def save_model_state(self, directory: str, background: bool = False) -> Writing:
        if not self.partial:
            return super().save_model_state(directory, background)
        st = self.backend.export_full(trainable_only=True)  # every rank: gathering is collective under ZeRO-3/FSDP
        if self.backend.is_main:
            if not st.model:
                raise RuntimeError("adapter checkpoint: the backend returned no trained parameter")
            st.save(directory, ADAPTER_FILE, ADAPTER_OPTIM_FILE)  # adapters are small: written at once
        return Writing()

    def load_model_state(self, directory: str, meta: dict) -> None:
        if not self.partial:
            return super().load_model_state(directory, meta)
        self.backend.import_full(read_adapter_state(directory), partial=True)

    def adapter_labels(self) -> Optional[list[str]]:
        """The class names an adapter's config records (classification), else None."""
        return None

    def write_extra_files(self, directory: str) -> None:
        if self.prompt_tuning or self.lora:
            # The base by path and by identity: load_base refuses a base whose digest differs
            # (retrained or replaced at that path since). Computed once, at the first save.
            from train.sft.adapters import init_digest

            base = self.init_dir or str(self.cfg.init_from)
            if self._base_digest is None:
                self._base_digest = init_digest(base)
        if self.prompt_tuning:
            from train.checkpoint.layout import PROMPT_TUNING_CONFIG

            pt = self.cfg.prompt_tuning
            with open(os.path.join(directory, PROMPT_TUNING_CONFIG), "w") as f:
                json.dump({"n_tokens": int(pt.n_tokens), "init_text": str(pt.init_text), "seed": int(pt.seed),
                           "base": base, "base_digest": self._base_digest, "task": self.cfg.task,
                           "labels": self.adapter_labels()}, f, indent=1)
        if self.lora:
            lo = self.cfg.lora
            info = {"name": lo.name, "rank": lo.rank, "alpha": lo.alpha, "dropout": lo.dropout,
                    "targets": list(lo.targets), "base": base, "base_digest": self._base_digest,
                    "task": self.cfg.task, "labels": self.adapter_labels(), "quantize": lo.quantize}
            with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
                json.dump(info, f, indent=1)

    # -- the before/after generations ------------------------------------------------------------
    def eval_prompts(self) -> list[str]:
        """Prompts of the before/after generation table; none unless the task generates."""
        return []

    def base_generations_file(self) -> str:
        return os.path.join(self.trainer.run_dir, "generations_base.json")

    def before_fit(self) -> None:
        """The starting model's answers to ``eval_prompts``, once per run directory (a fresh
        start: decided on rank 0 and broadcast, generation being collective when sharded)."""
        cfg, b = self.cfg, self.backend
        prompts, base_file = self.eval_prompts(), self.base_generations_file()
        fresh = str(cfg.resume) == "none" or ckpt.find_latest(self.trainer.ckpt_root) is None
        if b.broadcast_object(bool(prompts) and fresh and not os.path.exists(base_file)):
            before = self.generate_answers(prompts, cfg.eval.max_new_tokens)
            if b.is_main:
                with open(base_file, "w", encoding="utf-8") as f:
                    json.dump({"init_from": str(cfg.init_from), "answers": dict(zip(prompts, before))}, f, indent=1)
            b.barrier()

    def after_fit(self, result: dict) -> None:
        """The trained model's answers beside the starting model's (``eval.report``)."""
        cfg, b = self.cfg, self.backend
        prompts, base_file = self.eval_prompts(), self.base_generations_file()
        if b.broadcast_object(bool(prompts) and os.path.exists(base_file) and not result.get("stopped")
                              and result["final_step"] > result["start_step"]):
            after = self.generate_answers(prompts, cfg.eval.max_new_tokens)
            if b.is_main:
                with open(base_file, encoding="utf-8") as f:
                    before = json.load(f)["answers"]
                result["generations"] = write_generation_table(cfg.eval.report, prompts, before, after,
                                                               str(cfg.init_from), result["final_step"])
                result["generations_path"] = cfg.eval.report
        summary = self.data_summary()
        if summary is not None:
            data = summary[1]
            result["data_counts"] = dict(data.counts)
            if data.skipped is not None:
                result["skipped_by_reason"] = dict(data.skipped.reasons)

    def generate_answers(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy replies through the chat template (every rank: weights may be sharded)."""
        t = self.trainer
        tok = t.tokenizer
        stop = [tok.eos_id, tok.control["<|end_of_turn|>"]]
        ids = [encode_prompt(tok, p) for p in prompts]
        if self.prompt_tuning:
            from model.prompt_tuning import with_virtual_ids

            ids = with_virtual_ids(self.backend.raw_model, ids)
        with t.autocast():
            out = generate(self.backend.raw_model, ids, max_new_tokens, temperature=0.0, eos_id=stop,
                           device=self.backend.device)
        answers = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            answers.append(tok.decode(row[:cut]))
        return answers

    def plot(self) -> Optional[str]:
        """Pretraining (the init run's metrics.jsonl, when found) and fine-tuning in one PNG."""
        runs = []
        if self.init_dir:
            pre = os.path.join(os.path.dirname(os.path.dirname(self.init_dir)), "metrics.jsonl")
            if os.path.exists(pre):
                runs.append(("pretraining", pre))
        run_dir = self.trainer.run_dir
        runs.append((f"fine-tuning ({self.cfg.task})", os.path.join(run_dir, "metrics.jsonl"), self.loss_unit()))
        return plot_runs(runs, os.path.join(run_dir, "loss.png"), title=f"kiln: {self.cfg.run_name}")

    def loss_unit(self) -> str:
        """What one loss unit is, for the plot's axis: a token (LM tasks) or an example."""
        return "token"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "*(empty)*"


def write_generation_table(path: str, prompts: list[str], before: dict, after: list[str], base: str,
                           step: int) -> str:
    lines = [f"# Generations before and after fine-tuning (step {step})", "",
             f"Greedy decoding through the chat template; base = `{base}`.", "",
             "| prompt | base model | fine-tuned |", "| --- | --- | --- |"]
    for p, a in zip(prompts, after):
        lines.append(f"| {_cell(p)} | {_cell(before.get(p, ''))} | {_cell(a)} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text
