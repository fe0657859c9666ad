"""The thread count textok picks: the usable physical cores less those the load average says are busy, unless
``--threads`` or ``TEXTOK_THREADS`` say otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from textok import threads
from textok.errors import TextokError


def test_default_leaves_busy_cores_alone() -> None:
    assert threads.default_threads(cores=2, busy=0) == 2
    assert threads.default_threads(cores=2, busy=1) == 1  # one core running a study: one thread
    assert threads.default_threads(cores=2, busy=6) == 1  # never fewer than one
    assert threads.default_threads(cores=16, busy=3) == 13
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_requested_then_environment_then_default(monkeypatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    for name in (threads.THREADS_ENV, "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert threads.choose_threads() == (3, "4 cores, 1 busy by the load average")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on this node share the free cores
    assert threads.choose_threads() == (1, "4 cores, 1 busy by the load average, shared by 2 processes")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets: respected
    assert threads.choose_threads() == (1, "OMP_NUM_THREADS")
    monkeypatch.setenv(threads.THREADS_ENV, "2")
    assert threads.choose_threads() == (2, threads.THREADS_ENV)
    assert threads.choose_threads(5) == (5, "--threads")
    assert threads.choose_threads(0) == (2, threads.THREADS_ENV)  # 0: not chosen here
    monkeypatch.setenv(threads.THREADS_ENV, "two")
    with pytest.raises(TextokError, match="TEXTOK_THREADS must be a whole number"):
        threads.choose_threads()
    with pytest.raises(TextokError, match="--threads must be positive"):
        threads.choose_threads(-1)


def test_set_threads_sets_torch(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == (1, "--threads") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_option_before_or_after_the_verb(monkeypatch, capsys) -> None:
    from textok.cli import build_parser, main

    parser = build_parser(["info"])
    assert parser.parse_args(["--threads", "3", "info"]).threads == 3
    assert parser.parse_args(["info", "--threads", "2"]).threads == 2
    assert parser.parse_args(["info"]).threads is None
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    try:
        assert main(["info", "--threads", "2"]) == 0 and torch.get_num_threads() == 2
        assert main(["info", "--threads", "-1"]) == 2 and "--threads must be positive" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
