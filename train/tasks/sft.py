"""Supervised fine-tuning tasks (launch/sft.py): instruction tuning, classification, and
continued pretraining, each starting from a checkpoint (``FinetuneTask``).

- ``InstructionTask`` (``task=instruction``): chat / alpaca / prompt-completion records
  (train/sft/batches.py), packed several per row when ``sft.packing`` (the document mask
  then keeps them apart), loss on the tokens ``sft.mask`` names; checkpoints carry
  ``chat_template.jinja``; the before/after generation table.
- ``ClassificationTask`` (``task=classification``): ``TransformerClassifier``
  (model/classifier.py), one example per row; evaluation reports accuracy and macro-F1,
  and the end of the run writes ``classification_metrics.json``; checkpoints carry
  ``labels.json``.
- ``ContinuedPretrainingTask`` (``task=continued_pretraining``): the pretraining stream and
  document mask, from the checkpoint's weights.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from model.classifier import HEAD, TransformerClassifier
from model.llama import ModelConfig
from train.checkpoint import LABELS_FILE
from train.data import GlobalBatchSlicer, build_train_stream, starvation_warning
from train.data import validation_batches as stream_validation_batches
from train.sft.batches import RowStream, load_sft_data, make_collate, validation_batches
from train.sft.chat import JINJA_TEMPLATE, TEMPLATE_FILE
from train.sft.metrics import classification_report
from train.tasks.finetune import FinetuneTask


class _RecordsTask(FinetuneTask):
    """Labelled records read into memory once and cut into rows (train/sft/batches.py)."""

    classification = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.data = None  # train.sft.batches.SFTData once loaded

    def load_data(self) -> None:
        self.data = load_sft_data(self.cfg, self.trainer.tokenizer, self.classification)

    def data_summary(self):
        return ("sft data", self.data)

    def build_data(self):
        cfg, b = self.cfg, self.backend
        t, s = cfg.train, cfg.sft
        packed = self.document_mask()
        collate = make_collate(max(self.trainer.tokenizer.pad_id, 0), self.classification, packed)
        rows = RowStream(self.data.train, int(cfg.data.seq_len), packed, int(s.seed))
        train = GlobalBatchSlicer(rows, t.micro_batch_size, t.grad_accum_steps, b.rank, b.data_parallel_size,
                                  collate_fn=collate)
        val = validation_batches(self.data.val, int(cfg.data.seq_len), packed, collate, t.micro_batch_size,
                                 t.eval_sequences, b.rank, b.data_parallel_size)
        return train, val


class InstructionTask(_RecordsTask):
    name = "instruction"
    uses_chat_template = True

    def document_mask(self) -> bool:
        """Packed rows keep their examples apart (``sft.packing``: several examples per row)."""
        return bool(self.cfg.sft.packing)

    def eval_prompts(self) -> list[str]:
        return list(self.cfg.eval.prompts)

    def write_extra_files(self, directory: str) -> None:
        with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(JINJA_TEMPLATE)
        super().write_extra_files(directory)


class ClassificationTask(_RecordsTask):
    name = "classification"
    classification = True
    extra_trainable = (f"{HEAD}.",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.metrics: dict = {}  # the last evaluation's classification report

    def new_model(self, mc: ModelConfig) -> torch.nn.Module:
        weights = list(self.cfg.sft.class_weights) or None
        return TransformerClassifier(mc, len(self.data.labels), weights)

    def adapter_labels(self) -> Optional[list[str]]:
        return self.data.labels

    def write_extra_files(self, directory: str) -> None:
        with open(os.path.join(directory, LABELS_FILE), "w") as f:
            json.dump({"labels": self.data.labels}, f)
        super().write_extra_files(directory)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean class loss over every rank's held-out examples; accuracy and macro-F1 from
        every rank's labels and predictions."""
        t = self.trainer
        if not t.val_batches:
            return None
        loss_sum, count, labels, preds = 0.0, 0, [], []
        for logits, loss, _, y, _ in t.validation_outputs():
            loss_sum += float(loss) * len(y)
            count += len(y)
            labels += y.tolist()
            preds += logits.argmax(-1).tolist()
        loss_sum, count = self.backend.all_reduce_sum([loss_sum, count])
        pairs = self.backend.all_gather_object((labels, preds))
        all_labels = [y for lab, _ in pairs for y in lab]
        all_preds = [p for _, pr in pairs for p in pr]
        self.metrics = classification_report(all_labels, all_preds, self.data.labels)
        return loss_sum / count

    def eval_metrics(self) -> dict:
        m = self.metrics
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} if m else {}

    def after_fit(self, result: dict) -> None:
        super().after_fit(result)
        if self.metrics and self.backend.is_main:
            path = os.path.join(self.trainer.run_dir, "classification_metrics.json")
            with open(path, "w") as f:
                json.dump({"step": result["final_step"], **self.metrics}, f, indent=1)
            result["classification"] = self.metrics

    def loss_unit(self) -> str:
        return "example"


class ContinuedPretrainingTask(FinetuneTask):
    """The pretraining stream (``data.*``) from the checkpoint's weights."""

    name = "continued_pretraining"

    def build_data(self):
        cfg, b, tok = self.cfg, self.backend, self.trainer.tokenizer
        dp = b.data_parallel_size
        return build_train_stream(cfg, tok, b.rank, dp), stream_validation_batches(cfg, tok, b.rank, dp)

    def document_mask(self) -> bool:
        return bool(self.cfg.data.document_mask)

    def data_warning(self) -> Optional[str]:
        return starvation_warning(self.cfg, self.backend.device)
