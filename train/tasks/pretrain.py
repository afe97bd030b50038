"""Pretraining: a fresh (or ``init_from``) causal LM on the configured web/token data.

The task owns the pretraining choices the loop asks for: the tokenizer (configured, carried
by token shards or an ``hf:`` model, else trained on the data and cached in run_dir), the
architecture (``model.*``, or an imported HF model's), the ``Transformer`` built without
weights where the backend shards it, the packed training stream and held-out windows, and
the document mask (``data.document_mask``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
from omegaconf import OmegaConf

from data_pipeline import pipeline as data
from data_pipeline.token_shards import file_digest
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from model import hf_interop
from model.llama import ModelConfig, Transformer
from train import checkpoint as ckpt
from train.backends.collectives import RanksDisagree
from train.checkpoint.full_state import FullState, read_init_weights
from train.data import build_train_stream, starvation_warning, validation_batches
from train.errors import ConfigError
from train.log import logger
from train.metrics import plot_losses
from train.sharded_init import build_on_device
from train.tasks.base import Task


class PretrainTask(Task):
    name = "pretrain"

    def build_tokenizer(self) -> Tokenizer:
        return ensure_tokenizer(self.cfg, self.backend)

    def build_model_config(self) -> ModelConfig:
        return resolve_model_config(self.cfg, self.trainer.tokenizer)

    def build_model(self) -> torch.nn.Module:
        """The Transformer; where the backend shards it, built without weights (each rank
        initialises its own shard in ``backend.setup``), else built and initialised on the
        training device (train/sharded_init.py)."""
        mc = self.trainer.model_cfg
        if not self.backend.builds_deferred:
            return build_on_device(Transformer, mc, self.backend.device)
        with self.backend.model_init_context():
            return Transformer(mc, init_weights=False)

    def load_initial_weights(self) -> None:
        """``init_from`` weights, read once on rank 0 and streamed into the set-up backend."""
        if self.cfg.init_from:
            b, path = self.backend, str(self.cfg.init_from)
            b.import_full(b.on_main(f"reading init_from={path}",
                                    lambda: FullState(model=read_init_weights(
                                        path, self.trainer.model_cfg, str(self.cfg.checkpoint.verify)))))

    def build_data(self):
        cfg, b = self.cfg, self.backend
        dp = b.data_parallel_size
        tok = self.trainer.tokenizer
        r = b.data_parallel_rank  # a tensor-parallel group reads one micro-batch
        return build_train_stream(cfg, tok, r, dp), validation_batches(cfg, tok, r, dp)

    def document_mask(self) -> bool:
        """Whether packed windows keep their documents apart (``data.document_mask``)."""
        return bool(self.cfg.data.document_mask)

    def data_warning(self) -> Optional[str]:
        return starvation_warning(self.cfg, self.backend.device)

    def plot(self) -> Optional[str]:
        run_dir = self.trainer.run_dir
        return plot_losses(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"),
                           title=f"kiln: {self.cfg.run_name}")


def ensure_tokenizer(cfg, backend) -> Tokenizer:
    """The configured tokenizer, or one trained on the training split and cached in run_dir.

    Every rank must end up with the same file: rank 0 trains it while the others wait, then
    all ranks compare its digest, so a failed training run or a run_dir that another node
    cannot see stops every rank with a message instead of a collective timeout."""
    if data.is_token_data(cfg.data):  # tokenized shards fix the tokenizer: theirs, or a configured equal one
        path = _token_data_tokenizer(cfg)
    elif cfg.tokenizer.path:
        path = str(cfg.tokenizer.path)
    elif hf_init_dir(cfg):  # an imported HF model brings its tokenizer (SentencePiece only)
        try:
            path = hf_interop.hf_sentencepiece_path(hf_init_dir(cfg))
        except FileNotFoundError as e:
            raise ConfigError("init_from", str(e)) from None
    else:
        path = os.path.join(cfg.run_dir, ckpt.TOKENIZER)
    error = None
    if backend.is_main and not os.path.exists(path):
        t0 = time.time()
        try:
            texts = data.iter_texts(cfg.data, cfg.tokenizer.train_max_docs)
            tok = train_tokenizer(texts, path, vocab_size=cfg.tokenizer.vocab_size)
            logger().info(f"trained tokenizer ({tok.vocab_size} pieces) in {time.time() - t0:.1f}s -> {path}")
        except Exception as e:  # told to the other ranks below, then raised here
            error = e
    backend.barrier()
    seen = f"training failed: {error}" if error else _file_digest(path)
    try:
        backend.agree(f"the tokenizer file {path} (its digest, or why a rank has none: a run_dir on a "
                      "file system the other nodes cannot see?)", seen)
    except RanksDisagree as disagreement:
        if error is not None:
            raise error from disagreement
        raise
    if error is not None:
        raise error
    return Tokenizer(path)


def _file_digest(path: str) -> str:
    return file_digest(path) if os.path.isfile(path) else "missing"


def _token_data_tokenizer(cfg) -> str:
    """The tokenizer of tokenized-shard sources: ``tokenizer.path`` if set, else the copy the
    shards carry; either way it must be the one every shard was written with."""
    shards = data.token_shards(cfg.data)
    path = str(cfg.tokenizer.path) if cfg.tokenizer.path else shards[0].tokenizer_path
    if path is None:
        raise ConfigError("tokenizer.path", f"the token shards {shards[0].files[0]}... carry no tokenizer.model; "
                          "set tokenizer.path to the tokenizer they were written with")
    digest = file_digest(path)
    for sh in shards:
        if sh.tokenizer_digest != digest:
            raise ConfigError("tokenizer.path", f"{path} (digest {digest}) is not the tokenizer the token shards "
                              f"{sh.files[0]}... were written with (digest {sh.tokenizer_digest}, "
                              f"{sh.tokenizer_path or 'no copy beside them'})")
    return path


def resolve_model_config(cfg, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with ``vocab_size`` taken from the tokenizer when unset.

    Rounded up to a multiple of 64 so the embedding and output matmuls hit tensor-core
    friendly shapes; the extra rows are never produced by the tokenizer.
    """
    if hf_init_dir(cfg):  # the architecture is the HF model's; only kiln-only knobs come from cfg.model
        try:
            mc = hf_interop.model_config_from_hf(hf_interop.read_hf_config(hf_init_dir(cfg)),
                                                 dropout=cfg.model.dropout)
        except hf_interop.UnsupportedModelError as e:
            raise ConfigError("init_from", str(e)) from None
        if cfg.data.seq_len > mc.max_seq_len:
            raise ConfigError("data.seq_len", f"{cfg.data.seq_len} exceeds the imported model's "
                              f"max_position_embeddings={mc.max_seq_len}")
    else:
        mc = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    if mc.vocab_size is None:
        mc.vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)
    elif mc.vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", f"{mc.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} pieces ({tokenizer.path})")
    return mc



def hf_init_dir(cfg) -> str | None:
    """The local directory of ``init_from=hf:<dir>``, else None."""
    init = str(cfg.init_from) if cfg.init_from else ""
    return init[3:] if init.startswith("hf:") else None
