"""kiln's log (train/log.py): one format on standard output, rank 0 from INFO up, other ranks
only warnings (named by rank), written to the sys.stdout of the moment, never repeated
through the root logger."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from train import log


@pytest.fixture
def restore_rank():
    yield
    log.setup(0)


def test_rank_zero_logs_info_and_warnings_in_one_format(capsys, restore_rank):
    log.setup(0)
    log.logger().info("document mask: off")
    log.logger().warning("data may starve")
    assert capsys.readouterr().out == "[kiln] document mask: off\n[kiln] warning: data may starve\n"


def test_other_ranks_log_only_warnings_named_by_rank(capsys, restore_rank):
    log.setup(3)
    log.logger().info("model: 1M parameters")
    log.logger().warning("checkpoint is slow")
    assert capsys.readouterr().out == "[kiln rank 3] warning: checkpoint is slow\n"


def test_lines_follow_a_replaced_stdout_and_do_not_reach_the_root_logger(restore_rank, monkeypatch):
    log.setup(0)
    seen = []

    class Root(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = Root()
    logging.getLogger().addHandler(root)
    try:
        out = io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)  # replaced after the handler was made
        log.logger().info("sample: hello")
    finally:
        logging.getLogger().removeHandler(root)
    assert out.getvalue() == "[kiln] sample: hello\n" and seen == []
