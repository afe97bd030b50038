import itertools

import pytest
import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.document import Document
from data_pipeline.pipeline import document_stream, train_batches
from data_pipeline.stream import Batches, PackedStream, collate, split_of
from tests.conftest import SAMPLE_WARC


class ListDocs:
    """A finite document source with the stream interface."""

    def __init__(self, texts):
        self.texts, self.i = texts, 0

    def __next__(self):
        if self.i >= len(self.texts):
            raise StopIteration
        self.i += 1
        return Document(id=str(self.i), text=self.texts[self.i - 1])

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


TEXTS = [f"document number {i} " + "word " * (i * 7 % 23) for i in range(40)]


def test_packing_keeps_every_token_exactly_once_with_eos_between_documents(tokenizer):
    seq_len = 16
    windows = list(PackedStream(ListDocs(TEXTS), tokenizer, seq_len))
    expected = list(itertools.chain.from_iterable(tokenizer.encode(t, eos=True) for t in TEXTS))
    inputs = list(itertools.chain.from_iterable(w["tokens"][:-1].tolist() for w in windows))
    # Every window's inputs are the next seq_len tokens of the stream, none skipped or repeated;
    # only the tail shorter than one window is left in the buffer.
    assert inputs == expected[: len(inputs)]
    assert len(expected) - len(inputs) <= seq_len
    for w in windows:
        assert len(w["tokens"]) == seq_len + 1
    # Targets are inputs shifted by one, across window borders too.
    batch = collate(windows)
    assert torch.equal(batch["target"][:-1, -1], batch["input"][1:, 0])
    assert inputs.count(tokenizer.eos_id) >= len(TEXTS) - 1  # one EOS after every document


def test_doc_ids_change_exactly_after_eos(tokenizer):
    for w in PackedStream(ListDocs(TEXTS), tokenizer, 32):
        toks, docs = w["tokens"].tolist(), w["doc_ids"].tolist()
        assert docs[0] == 0
        for i in range(1, len(toks)):
            assert docs[i] == docs[i - 1] + (1 if toks[i - 1] == tokenizer.eos_id else 0)


def test_packed_stream_resumes_exactly_from_its_state(tokenizer):
    a = PackedStream(ListDocs(TEXTS), tokenizer, 8)
    for _ in range(13):
        next(a)
    state = a.state_dict()
    rest_a = [w["tokens"] for w in a]
    b = PackedStream(ListDocs(TEXTS), tokenizer, 8)
    b.load_state_dict(state)
    rest_b = [w["tokens"] for w in b]
    assert len(rest_a) > 5 and len(rest_a) == len(rest_b)
    assert all(torch.equal(x, y) for x, y in zip(rest_a, rest_b))


def sample_cfg(**kw):
    return DataConfig(sources=[SourceConfig(paths=[SAMPLE_WARC])], seq_len=32, **kw)


def test_train_and_validation_splits_are_disjoint_and_stable():
    cfg = sample_cfg(val_fraction=0.1)
    train_ids = {d.id for d in document_stream(cfg, split="train", loop=False)}
    val_ids = {d.id for d in document_stream(cfg, split="val", loop=False)}
    assert train_ids and val_ids and not (train_ids & val_ids)
    assert 0.03 < len(val_ids) / (len(train_ids) + len(val_ids)) < 0.2
    assert all(split_of(i, 0.1) == "val" for i in val_ids)


def test_training_stream_resumes_mid_file_with_identical_batches(tokenizer):
    cfg = sample_cfg()
    a = train_batches(cfg, tokenizer, micro_batch_size=4)
    for _ in range(30):
        next(a)
    state = a.state_dict()
    assert state["docs"]["reader"]["position"] > 0  # resumes by seeking, not by re-reading
    want = [next(a)["input"] for _ in range(5)]
    b = train_batches(cfg, tokenizer, micro_batch_size=4)
    b.load_state_dict(state)
    got = [next(b)["input"] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(want, got))


def test_training_stream_loops_over_epochs(tokenizer):
    cfg = sample_cfg(val_fraction=0.0)
    stream = document_stream(cfg, split="train", loop=True)
    first = [next(stream).id for _ in range(5)]
    while stream.epoch == 0:
        next(stream)
    # The first document of epoch 1 was just consumed; the next four repeat epoch 0's order.
    assert [next(stream).id for _ in range(4)] == first[1:]


def test_batches_state_is_the_stream_state(tokenizer):
    b = Batches(PackedStream(ListDocs(TEXTS), tokenizer, 8), 2)
    next(b)
    assert b.state_dict()["docs"] == {"i": b.stream.docs.i}


def _packed_batch_with_a_boundary(trainer):
    for _ in range(20):
        batch = next(trainer.train_batches)
        if any(len(set(row.tolist())) > 1 for row in batch["doc_ids"]):
            return batch
    raise AssertionError("no packed window with two documents in 20 micro-batches")


def _token_sum_loss(model, x, y, **kw):
    logits, _ = model(x, **kw)  # the loss summed in the model's float64, not the fp32 loss path
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))


@torch.no_grad()
def test_a_packed_window_loss_is_the_sum_of_its_documents_losses(tiny_cfg):
    """Pretraining through the trainer keeps a window's documents apart by default: the
    window's summed loss is what each document gives fed alone; with
    data.document_mask=false attention crosses documents and the sums differ."""
    from train.trainer import Trainer

    trainer = Trainer(tiny_cfg("data.seq_len=64"))
    model = trainer.backend.model.double()  # float64: equal to 1e-9, where crossing documents moves it by 1e-5
    model.eval()
    batch = _packed_batch_with_a_boundary(trainer)
    x, y, extra = trainer.model_inputs(batch)
    assert set(extra) == {"doc_ids", "position_ids"}
    alone = 0.0
    for r in range(x.shape[0]):
        ids = batch["doc_ids"][r]
        for d in ids.unique().tolist():
            seg = (ids == d).nonzero().flatten()
            a, b = int(seg[0]), int(seg[-1]) + 1
            alone += _token_sum_loss(model, x[r:r + 1, a:b], y[r:r + 1, a:b])
    packed = _token_sum_loss(model, x, y, **extra)
    assert packed == pytest.approx(alone, rel=1e-9)

    trainer.cfg.data.document_mask = False
    x, y, extra = trainer.model_inputs(batch)
    assert extra == {}
    assert _token_sum_loss(model, x, y) != pytest.approx(alone, rel=1e-7)


def test_the_run_header_states_the_document_masking(tiny_cfg, capsys):
    from model.llama import uses_flex
    from train.trainer import Trainer

    trainer = Trainer(tiny_cfg())
    trainer._print_header(None)
    assert "[kiln] document mask: on (dense)" in capsys.readouterr().out  # CPU: SDPA with a dense mask
    trainer.cfg.data.document_mask = False
    trainer._print_header(None)
    assert "[kiln] document mask: off" in capsys.readouterr().out
    cuda = torch.device("cuda")
    assert uses_flex(trainer.model_cfg, cuda)  # what a GPU run's header says: on (flex)
    assert not uses_flex(trainer.model_cfg, torch.device("cpu"))


def test_a_gpu_run_on_the_fly_without_workers_is_warned_of_starvation(tiny_cfg):
    from train.data import starvation_warning

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    warned = starvation_warning(tiny_cfg("train=gpu"), cuda)
    assert warned and "data.num_workers=0" in warned and "data=prepared" in warned
    assert "train.data_sharding=sequences" in starvation_warning(
        tiny_cfg("data.num_workers=4", "train.data_sharding=sequences"), cuda)
    assert starvation_warning(tiny_cfg("data.num_workers=4"), cuda) is None  # workers take the chain off
    assert starvation_warning(tiny_cfg(), cpu) is None  # the CPU demo: the chain is not the bound
