"""train.data_sharding=shards on the embedded sample: the global batch of every step is
the same on one and two ranks, each of two ranks does half the pipeline work (counted,
not timed), and a checkpointed position moves between world sizes exactly. The real
2-process launches (DDP, FSDP, ZeRO) that resume 2 -> 1 and 1 -> 2 on this mode are in
tests/test_distributed.py, which runs the default mode."""

from __future__ import annotations

import json

import pytest

from train.data import VirtualShards, build_train_stream, merge_shard_states


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg("train.micro_batch_size=4", "train.virtual_shards=4")


def stream(cfg, tokenizer, rank: int, world: int):
    cfg.train.micro_batch_size = 4 // world  # the same global batch of 4 rows
    return build_train_stream(cfg, tokenizer, rank, world)


def one_and_two_ranks(cfg, tokenizer, steps: int):
    """The streams of world size 1 and of both ranks of world size 2, ``steps`` steps in."""
    one = stream(cfg, tokenizer, 0, 1)
    two = [stream(cfg, tokenizer, r, 2) for r in range(2)]
    for _ in range(steps):
        for s in (one, *two):
            next(s)
    return one, two


def rows(batch) -> list[tuple]:
    return sorted(tuple(r.tolist()) for r in batch["input"])


def test_the_global_batch_of_each_step_is_the_same_on_one_and_two_ranks(cfg, tokenizer):
    one = stream(cfg, tokenizer, 0, 1)
    two = [stream(cfg, tokenizer, r, 2) for r in range(2)]
    assert isinstance(one.windows, VirtualShards) and sorted(two[1].windows.shards) == [1, 3]
    for _ in range(6):
        assert rows(next(one)) == sorted(rows(next(two[0])) + rows(next(two[1])))


def test_each_of_two_ranks_runs_half_the_pipeline_work(tiny_cfg, tokenizer):
    """Counted in bytes through the pipeline: every shard yields the same number of windows,
    so documents per shard follow document lengths (one long page is many windows), while
    bytes even out once every shard has read a few dozen pages (400 steps here)."""
    cfg = tiny_cfg("model.max_seq_len=256", "data.seq_len=256")  # 8 virtual shards, the default
    one, two = one_and_two_ranks(cfg, tokenizer, 400)
    work_one = one.windows.pipeline_work()
    work_two = [s.windows.pipeline_work() for s in two]
    assert work_one["documents"] > 60
    for key in ("documents", "bytes"):  # the same shards did the same work, split between the ranks
        assert work_two[0][key] + work_two[1][key] == work_one[key]
    for w in work_two:
        assert abs(w["bytes"] - work_one["bytes"] / 2) <= 0.1 * work_one["bytes"] / 2, (work_one, work_two)


def test_a_two_rank_position_resumes_exactly_on_one_rank_and_back(cfg, tokenizer):
    reference = stream(cfg, tokenizer, 0, 1)
    expected = [rows(next(reference)) for _ in range(9)]

    two = [stream(cfg, tokenizer, r, 2) for r in range(2)]
    for _ in range(3):
        for s in two:
            next(s)
    state = merge_shard_states([s.state_dict() for s in two])
    state = json.loads(json.dumps(state))  # as trainer_state.json stores it

    one = stream(cfg, tokenizer, 0, 1)
    one.load_state_dict(state)
    assert [rows(next(one)) for _ in range(3)] == expected[3:6]

    back = [stream(cfg, tokenizer, r, 2) for r in range(2)]
    for s in back:
        s.load_state_dict(json.loads(json.dumps(one.state_dict())))
    assert [sorted(rows(next(back[0])) + rows(next(back[1]))) for _ in range(3)] == expected[6:9]


def test_the_saved_position_holds_each_shard_once_whatever_the_world_size(cfg, tokenizer):
    one, two = one_and_two_ranks(cfg, tokenizer, 5)
    merged = merge_shard_states([s.state_dict() for s in two])
    assert sorted(merged["stream"]["shards"]) == ["0", "1", "2", "3"]
    assert json.dumps(merged, sort_keys=True) == json.dumps(one.state_dict(), sort_keys=True)


def test_a_world_size_that_does_not_divide_the_shards_names_the_key(cfg, tokenizer):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="config error: train.virtual_shards: 4 shards cannot be split evenly over 3 ranks"):
        build_train_stream(cfg, tokenizer, 0, 3)
