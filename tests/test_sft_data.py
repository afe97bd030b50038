"""Fine-tuning data: the loss mask comes from role spans, bad records are named or counted,
every input format and container gives the same examples, truncation is explicit."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from tests.sft_helpers import write_jsonl
from train.sft.batches import IGNORE, Example, collate_lm, lm_example, pack_rows
from train.sft.chat import encode_chat, render_text
from train.sft.records import BadRecord, Record, SkipCounter, read_records

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "An ordered sequence."},
        {"role": "user", "content": "And a set?"},
        {"role": "assistant", "content": "Unordered, unique items."}]


class Opts:
    """The cfg.sft block fields read_records needs."""

    def __init__(self, **kw):
        self.source, self.hf_split, self.format, self.text_key, self.label_key = "auto", "train", "auto", "text", "label"
        self.__dict__.update(kw)


def expected_targets(tok, messages, trained_turns):
    """Hand-built expectation: after the role token, content + end-of-turn of trained turns."""
    eot = tok.control["<|end_of_turn|>"]
    out = []
    for i, m in enumerate(messages):
        content = tok.encode(m["content"])
        out += [None] + [(t if i in trained_turns else None) for t in content + [eot]]
    return out[1:]  # target at position j is token j+1


def test_mask_covers_exactly_the_assistant_tokens_and_their_end_of_turn(tokenizer):
    ex = lm_example(Record("x:1", messages=CHAT), tokenizer, 512, "assistant", "drop", Counter())
    want = expected_targets(tokenizer, CHAT, {2, 4})
    assert ex.target == [IGNORE if t is None else t for t in want]
    eot = tokenizer.control["<|end_of_turn|>"]
    trained = [t for t in ex.target if t != IGNORE]
    assert trained.count(eot) == 2  # each assistant turn's end-of-turn is a target
    assert tokenizer.decode([t for t in trained if t != eot]) == "An ordered sequence.Unordered, unique items."
    assert ex.input == encode_chat(tokenizer, CHAT).ids[:-1]


@pytest.mark.parametrize("mask,turns", [("last_assistant", {4}), ("all_turns", {0, 1, 2, 3, 4})])
def test_other_mask_policies(tokenizer, mask, turns):
    ex = lm_example(Record("x:1", messages=CHAT), tokenizer, 512, mask, "drop", Counter())
    assert ex.target == [IGNORE if t is None else t for t in expected_targets(tokenizer, CHAT, turns)]


def test_mask_all_trains_every_next_token(tokenizer):
    ex = lm_example(Record("x:1", messages=CHAT), tokenizer, 512, "all", "drop", Counter())
    ids = encode_chat(tokenizer, CHAT).ids
    assert ex.target == ids[1:]


def test_spans_not_strings_decide_the_mask(tokenizer):
    # The answer repeats the question word for word: string matching could not tell them apart.
    msgs = [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "say hello"}]
    ex = lm_example(Record("x:1", messages=msgs), tokenizer, 512, "assistant", "drop", Counter())
    n = len(tokenizer.encode("say hello"))
    assert sum(t != IGNORE for t in ex.target) == n + 1
    assert all(t == IGNORE for t in ex.target[: n + 1])


def test_example_without_trainable_token_raises_naming_the_record(tokenizer):
    rec = Record("data.jsonl:7", messages=[{"role": "user", "content": "no answer here"}])
    with pytest.raises(BadRecord, match=r"data.jsonl:7: no trainable token"):
        lm_example(rec, tokenizer, 512, "assistant", "drop", Counter())


def test_truncation_policy_is_explicit_and_counted(tokenizer):
    long = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "yes " * 40}]
    prompt_len = len(tokenizer.encode(long[0]["content"])) + 3  # role, content, end-of-turn, role
    counts = Counter()
    assert lm_example(Record("a:1", messages=long), tokenizer, 32, "assistant", "drop", counts) is None
    ex = lm_example(Record("a:1", messages=long), tokenizer, prompt_len + 5, "assistant", "truncate", counts)
    assert len(ex.input) == prompt_len + 5 and sum(t != IGNORE for t in ex.target) == 6  # seq_len + 1 ids kept
    # Cut before the answer starts: nothing left to learn, dropped and counted, not a zero loss.
    assert lm_example(Record("a:1", messages=long), tokenizer, prompt_len - 3, "assistant", "truncate",
                      counts) is None
    assert counts == {"dropped_too_long": 1, "truncated": 2, "dropped_truncated_to_no_target": 1}


def test_pad_is_its_own_token_and_never_a_target(tokenizer):
    a = Example([5, 6, 7], [6, 7, IGNORE])
    b = Example([8], [9])
    batch = collate_lm([[a], [b]], tokenizer.pad_id, packed=False)
    assert batch["input"][1].tolist() == [8, tokenizer.pad_id, tokenizer.pad_id]
    assert batch["target"][1].tolist() == [9, IGNORE, IGNORE]
    assert batch["loss_tokens"] == 3 and tokenizer.pad_id == 3
    assert tokenizer.pad_id not in (tokenizer.eos_id, *tokenizer.control.values())


def test_formats_alpaca_chat_prompt_completion(tmp_path):
    rows = [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Greet", "output": "Hello", "system": "Be kind."},
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    recs = read_records([path], Opts(), False, SkipCounter(False))
    assert [r.messages for r in recs] == [
        [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Greet"},
         {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]
    assert recs[2].where == f"{path}:3"


def test_parquet_and_local_hf_dataset_give_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hfds"))
    got = [[r.messages for r in read_records([p], Opts(), False, SkipCounter(False))]
           for p in (jsonl, str(tmp_path / "d.parquet"), str(tmp_path / "hfds"))]
    assert got[0] == got[1] == got[2] and len(got[0]) == 5


BAD = [
    ('{"instruction": "q"}', "missing field 'output'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "wrong role 'bot'"),
    ('{"instruction": "q", "output": "   "}', "field 'output' is empty"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}', "is empty"),
    ('{"prompt": "q", "completion": 3}', "must be a string"),
    ('{"instruction": "q <|assistant|> x", "output": "a"}', "control token"),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize("line,reason", BAD)
def test_bad_record_error_names_file_and_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "fine", "completion": "ok"}', line])
    with pytest.raises(BadRecord) as e:
        read_records([path], Opts(), False, SkipCounter(False))
    assert f"{path}:2:" in str(e.value) and reason in str(e.value)


def test_bad_records_are_skipped_and_counted_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "fine", "completion": "ok"}'] + [b for b, _ in BAD])
    skipped = SkipCounter(True)
    recs = read_records([path], Opts(), False, skipped)
    assert len(recs) == 1 and skipped.total == len(BAD)
    assert skipped.reasons["invalid JSON"] == 1


def test_classification_records(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "spam spam", "label": "remove"}, {"text": "docs"}])
    with pytest.raises(BadRecord, match=r"c.jsonl:2: missing field 'label'"):
        read_records([path], Opts(), True, SkipCounter(False))


def test_template_string_equals_span_encoding(tokenizer):
    assert render_text(CHAT) == ("<|system|>Be brief.<|end_of_turn|><|user|>What is a list?<|end_of_turn|>"
                                 "<|assistant|>An ordered sequence.<|end_of_turn|><|user|>And a set?<|end_of_turn|>"
                                 "<|assistant|>Unordered, unique items.<|end_of_turn|>")
    assert tokenizer.encode(render_text(CHAT, True)) == encode_chat(tokenizer, CHAT, add_generation_prompt=True).ids


def test_next_fit_packing_respects_the_row_length():
    rows = pack_rows([5, 4, 3, 6, 1], range(5), 10, packing=True)
    assert rows == [[0, 1], [2, 3, 4]]
    assert pack_rows([5, 4], range(2), 10, packing=False) == [[0], [1]]


def test_shipped_instruction_set_is_real_and_clean():
    from train.config import ASSETS

    path = os.path.join(ASSETS, "sft", "python_qa.jsonl")
    recs = read_records([path], Opts(), False, SkipCounter(False))
    assert len(recs) >= 300
    first = json.loads(open(path).readline())
    assert first["source"].startswith("https://docs.python.org/3.11/")
    assert all(r.messages[-1]["content"].endswith((".", ")")) for r in recs)
    assert len({r.messages[0]["content"] for r in recs}) == len(recs)  # no duplicate question
