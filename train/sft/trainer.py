"""Fine-tuning through the one training loop: ``SFTTrainer`` only changes what is built.

- tokenizer and architecture come from the ``init_from`` checkpoint (the tokenizer travels
  with it as ``tokenizer.model``), from any backend and world size (``read_full_state``);
- data: chat/alpaca/prompt-completion or classification records (``train/sft/batches.py``),
  or the pretraining stream for ``task=continued_pretraining``;
- model: the LM, or ``TransformerClassifier`` for ``task=classification``, optionally with
  a LoRA adapter (only the adapter, and a head, train);
- checkpoints: the usual full state, or for LoRA runs the adapter (+ head) and its AdamW
  moments only, gathered through the backend so ZeRO-3 never writes an empty adapter;
  plus ``chat_template.jinja``, ``adapter_config.json`` (with the base's path and digest), ``labels.json``;
- evaluation: held-out loss (the loop's), accuracy / macro-F1 for classification, and a
  before/after table of greedy generations for fixed prompts (``eval.report``).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Optional

import torch

from data_pipeline.tokenizer import Tokenizer
from model.classifier import HEAD, TransformerClassifier
from model.llama import ModelConfig, Transformer, generate
from model.lora import add_lora, quantize_base_4bit, train_only
from train import checkpoint as ckpt
from train.backends.base import Writing
from train.checkpoint import ADAPTER_CONFIG, ADAPTER_FILE, ADAPTER_OPTIM_FILE, LABELS_FILE
from train.checkpoint.full_state import FullState, load_weights, read_adapter_state, read_init_weights
from train.config import ConfigError
from train.data import GlobalBatchSlicer
from train.metrics import plot_runs
from train.sft.batches import RowStream, load_sft_data, make_collate, validation_batches
from train.sft.chat import JINJA_TEMPLATE, TEMPLATE_FILE, control_ids, encode_prompt
from train.sft.metrics import classification_report
from train.trainer import Trainer, resolve_model_config


def init_step_dir(cfg) -> Optional[str]:
    """The step directory ``init_from`` names (None for ``hf:`` models)."""
    init = str(cfg.init_from)
    if init.startswith("hf:"):
        return None
    try:
        return ckpt.resolve(init, str(cfg.checkpoint.verify))  # the run's one verification of it
    except FileNotFoundError as e:
        raise ConfigError("init_from", f"{e}. Make the default one with `python launch/pretrain.py`") from None


class SFTTrainer(Trainer):
    def __init__(self, cfg):
        self.task = cfg.task
        self.classification = cfg.task == "classification"
        self.lora = bool(cfg.lora.enabled)
        self.init_dir = init_step_dir(cfg)
        self.sft_data = None
        self._cls_metrics: dict = {}
        super().__init__(cfg)

    # -- what is built --------------------------------------------------------------------
    def build_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if cfg.tokenizer.path:
            tok = Tokenizer(cfg.tokenizer.path)
        elif self.init_dir is None:
            tok = super().build_tokenizer()  # hf: its tokenizer.model
        else:
            path = os.path.join(self.init_dir, ckpt.TOKENIZER)
            if not os.path.isfile(path):
                raise ConfigError("init_from", f"{self.init_dir} has no tokenizer.model; set tokenizer.path")
            tok = Tokenizer(path)
        if self.task == "instruction":
            control_ids(tok)  # the chat template needs the reserved tokens
        return tok

    def build_model_config(self) -> ModelConfig:
        """The checkpoint's architecture (``model.dropout`` from this config); written back
        into cfg.model so the saved config.yaml describes the model really trained."""
        cfg = self.cfg
        if self.init_dir is None:
            mc = resolve_model_config(cfg, self.tokenizer)
        else:
            mc = ckpt.read_model_config(self.init_dir)
            mc.dropout = float(cfg.model.dropout)
        if cfg.data.seq_len > mc.max_seq_len:
            raise ConfigError("data.seq_len", f"{cfg.data.seq_len} exceeds the checkpoint's max_seq_len={mc.max_seq_len}")
        if mc.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError("tokenizer.path", f"{self.tokenizer.vocab_size} pieces but the checkpoint has "
                              f"{mc.vocab_size} embedding rows")
        for f in fields(ModelConfig):
            cfg.model[f.name] = getattr(mc, f.name)
        self.load_task_data()
        return mc

    def load_task_data(self) -> None:
        """The fine-tuning records, read once the tokenizer and sequence length are known."""
        if self.task != "continued_pretraining":
            self.sft_data = load_sft_data(self.cfg, self.tokenizer, self.classification)

    def new_model(self, mc: ModelConfig) -> torch.nn.Module:
        """The network being fine-tuned, before its weights are loaded."""
        if self.classification:
            weights = list(self.cfg.sft.class_weights) or None
            return TransformerClassifier(mc, len(self.sft_data.labels), weights)
        return Transformer(mc)

    def build_model(self) -> torch.nn.Module:
        cfg, mc = self.cfg, self.model_cfg
        model = self.new_model(mc)
        # Read (and, for a DeepSpeed checkpoint, converted) once on rank 0, streamed to the others.
        b, path = self.backend, str(cfg.init_from)
        src, mode = (self.init_dir, "off") if self.init_dir else (path, str(cfg.checkpoint.verify))  # verified once
        base = b.on_main(f"reading init_from={path}", lambda: FullState(model=read_init_weights(src, mc, mode)))
        load_weights(model, b.full_state_from_main(base).model, path)
        if self.lora:
            lo = cfg.lora
            add_lora(model, lo.name, lo.rank, lo.alpha, lo.dropout, list(lo.targets))
            train_only(model, lo.name, extra_prefixes=(f"{HEAD}.",) if self.classification else ())
            if lo.quantize == "4bit":
                if cfg.backend.name not in ("single", "ddp"):
                    raise ConfigError("lora.quantize", "4-bit base weights work with backend=single or ddp only")
                quantize_base_4bit(model.to(self.backend.device))
        return model

    def load_initial_weights(self) -> None:
        """Already done in ``build_model``: LoRA adapters and a head are built around the base
        weights, so every rank builds the whole model (no sharded initialisation for SFT)."""

    def document_mask(self) -> bool:
        """Packed SFT rows keep their examples apart (``sft.packing``: several examples per
        row); continued pretraining follows ``data.document_mask`` as pretraining does."""
        if self.task == "continued_pretraining":
            return super().document_mask()
        return bool(self.cfg.sft.packing) and not self.classification

    def data_warning(self):
        """Labelled records are read into memory once; only continued pretraining runs the
        web data chain."""
        return super().data_warning() if self.task == "continued_pretraining" else None

    def build_data(self):
        if self.task == "continued_pretraining":
            return super().build_data()
        cfg, b = self.cfg, self.backend
        t, s = cfg.train, cfg.sft
        packed = self.document_mask()
        collate = make_collate(max(self.tokenizer.pad_id, 0), self.classification, packed)
        rows = RowStream(self.sft_data.train, int(cfg.data.seq_len), packed, int(s.seed))
        train = GlobalBatchSlicer(rows, t.micro_batch_size, t.grad_accum_steps, b.rank, b.data_parallel_size,
                                  collate_fn=collate)
        val = validation_batches(self.sft_data.val, int(cfg.data.seq_len), packed, collate, t.micro_batch_size,
                                 t.eval_sequences, b.rank, b.data_parallel_size)
        return train, val

    # -- checkpoints ------------------------------------------------------------------------
    def save_model_state(self, directory: str, background: bool = False) -> Writing:
        if not self.lora:
            return super().save_model_state(directory, background)
        st = self.backend.export_full(trainable_only=True)  # every rank: gathering is collective under ZeRO-3/FSDP
        if self.backend.is_main:
            if not st.model:
                raise RuntimeError("LoRA checkpoint: the backend returned no trained parameter")
            st.save(directory, ADAPTER_FILE, ADAPTER_OPTIM_FILE)  # adapters are small: written at once
        return Writing()

    def load_model_state(self, directory: str, meta: dict) -> None:
        if not self.lora:
            return super().load_model_state(directory, meta)
        self.backend.import_full(read_adapter_state(directory), partial=True)

    def write_extra_files(self, directory: str) -> None:
        cfg = self.cfg
        if self.task == "instruction":
            with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
                f.write(JINJA_TEMPLATE)
        if self.classification:
            with open(os.path.join(directory, LABELS_FILE), "w") as f:
                json.dump({"labels": self.sft_data.labels}, f)
        if self.lora:
            # The base by path and by identity: load_base refuses a base whose digest differs
            # (retrained or replaced at that path since). Computed once, at the first save.
            from train.sft.adapters import init_digest

            lo, base = cfg.lora, self.init_dir or str(cfg.init_from)
            if getattr(self, "_base_digest", None) is None:
                self._base_digest = init_digest(base)
            info = {"name": lo.name, "rank": lo.rank, "alpha": lo.alpha, "dropout": lo.dropout,
                    "targets": list(lo.targets), "base": base, "base_digest": self._base_digest, "task": self.task,
                    "labels": self.sft_data.labels if self.classification else None}
            with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
                json.dump(info, f, indent=1)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if not self.classification:
            return super().evaluate()
        if not self.val_batches:
            return None
        loss_sum, count, labels, preds = 0.0, 0, [], []
        for logits, loss, _, y, _ in self.validation_outputs():
            loss_sum += float(loss) * len(y)
            count += len(y)
            labels += y.tolist()
            preds += logits.argmax(-1).tolist()
        loss_sum, count = self.backend.all_reduce_sum([loss_sum, count])
        pairs = self.backend.all_gather_object((labels, preds))
        all_labels = [y for lab, _ in pairs for y in lab]
        all_preds = [p for _, pr in pairs for p in pr]
        self._cls_metrics = classification_report(all_labels, all_preds, self.sft_data.labels)
        return loss_sum / count

    def extra_eval_metrics(self) -> dict:
        m = self._cls_metrics
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} if m else {}

    def generate_answers(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy replies through the chat template (every rank: weights may be sharded)."""
        tok = self.tokenizer
        stop = [tok.eos_id, tok.control["<|end_of_turn|>"]]
        ids = [encode_prompt(tok, p) for p in prompts]
        with self.autocast():
            out = generate(self.backend.raw_model, ids, max_new_tokens, temperature=0.0, eos_id=stop,
                           device=self.backend.device)
        answers = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            answers.append(tok.decode(row[:cut]))
        return answers

    def fit(self) -> dict:
        cfg, b = self.cfg, self.backend
        prompts = list(cfg.eval.prompts) if self.task in ("instruction", "preference") else []
        base_file = os.path.join(self.run_dir, "generations_base.json")
        # Decided on rank 0 and broadcast: generation is collective when weights are sharded.
        fresh = str(cfg.resume) == "none" or _no_checkpoint(self.ckpt_root)
        if b.broadcast_object(bool(prompts) and fresh and not os.path.exists(base_file)):
            before = self.generate_answers(prompts, cfg.eval.max_new_tokens)
            if b.is_main:
                with open(base_file, "w", encoding="utf-8") as f:
                    json.dump({"init_from": str(cfg.init_from), "answers": dict(zip(prompts, before))}, f, indent=1)
            b.barrier()
        result = super().fit()
        if b.broadcast_object(bool(prompts) and os.path.exists(base_file) and not result.get("stopped")
                              and result["final_step"] > result["start_step"]):
            after = self.generate_answers(prompts, cfg.eval.max_new_tokens)
            if b.is_main:
                with open(base_file, encoding="utf-8") as f:
                    before = json.load(f)["answers"]
                result["generations"] = write_generation_table(cfg.eval.report, prompts, before, after,
                                                               str(cfg.init_from), result["final_step"])
                result["generations_path"] = cfg.eval.report
        if self.classification and self._cls_metrics and b.is_main:
            path = os.path.join(self.run_dir, "classification_metrics.json")
            with open(path, "w") as f:
                json.dump({"step": result["final_step"], **self._cls_metrics}, f, indent=1)
            result["classification"] = self._cls_metrics
        if self.sft_data is not None:
            result["data_counts"] = dict(self.sft_data.counts)
            if self.sft_data.skipped is not None:
                result["skipped_by_reason"] = dict(self.sft_data.skipped.reasons)
        return result

    def plot(self) -> Optional[str]:
        """Pretraining (the init run's metrics.jsonl, when found) and fine-tuning in one PNG."""
        runs = []
        if self.init_dir:
            pre = os.path.join(os.path.dirname(os.path.dirname(self.init_dir)), "metrics.jsonl")
            if os.path.exists(pre):
                runs.append(("pretraining", pre))
        runs.append((f"fine-tuning ({self.task})", os.path.join(self.run_dir, "metrics.jsonl"),
                     "example" if self.classification else "token"))
        return plot_runs(runs, os.path.join(self.run_dir, "loss.png"), title=f"kiln: {self.cfg.run_name}")


def _no_checkpoint(root: str) -> bool:
    return ckpt.find_latest(root) is None


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

