"""The one estimated-time line before long work: printed once, after the first (warm-up) step and a few timed ones."""

from __future__ import annotations

import io

from textok.eta import Eta, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_after_the_timed_steps() -> None:
    clock, out = Clock(), io.StringIO()
    eta = Eta(100, "train", stream=out, clock=clock)
    clock.now = 30.0  # a slow first step: warm-up, not timed
    eta.step()
    for _ in range(5):
        clock.now += 2.0
        eta.step()
        if eta.timed < 5:
            assert out.getvalue() == ""
    assert out.getvalue() == "train: about 3 min for the 94 steps left of 100 (0.5 steps/s)\n"
    for _ in range(20):
        eta.step()
    assert out.getvalue().count("\n") == 1


def test_resumed_runs_and_tiny_jobs() -> None:
    clock, out = Clock(), io.StringIO()
    eta = Eta(1000, "train", stream=out, clock=clock, done=900)  # resumed at step 900
    for _ in range(6):
        clock.now += 0.5
        eta.step()
    assert "about 47 s for the 94 steps left of 1000 (2 steps/s)" in out.getvalue()
    quiet = io.StringIO()
    Eta(1, "x", stream=quiet).step()
    assert quiet.getvalue() == ""


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.2, 40, 89, 95, 3600, 7300)] == ["1 s", "40 s", "89 s", "2 min", "60 min",
                                                                           "2 h 02 min"]


def test_training_prints_its_estimate_with_the_threads(tmp_path, capsys) -> None:
    from textok.cli import main

    args = ["train-tokenizer", "--config", "textok-tiny", "--out", str(tmp_path / "run"), "--max-steps", "60",
            "--no-progress", "batch_size=2", "data.train_size=4", "data.val_size=2", "log_every=60", "ckpt_every=60"]
    assert main(["--threads", "1", *args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "about" in line]
    assert len(lines) == 1 and lines[0].startswith(f"train run: about ") and "steps left of 60" in lines[0]
    assert "1 CPU thread, --threads N to change" in lines[0]


def test_a_progress_bar_prints_the_line_above_itself() -> None:
    clock, written = Clock(), []
    eta = Eta(20, "train", clock=clock, write=written.append)
    for _ in range(7):
        clock.now += 1.0
        eta.step()
    assert written == ["train: about 14 s for the 14 steps left of 20 (1 steps/s)"]
