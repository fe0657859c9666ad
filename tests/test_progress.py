"""Progress bars draw on a terminal and stay quiet when output goes to a file or a pipe (CI logs, nohup)."""

from __future__ import annotations

import io

from textok.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_draws_on_a_terminal_only() -> None:
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        with progress_bar(range(3), file=stream, mininterval=0) as bar:
            assert bar.disable is not drawn and list(bar) == [0, 1, 2]
        assert (stream.getvalue() != "") is drawn


def test_disable_still_turns_it_off_on_a_terminal() -> None:
    stream = Terminal()
    with progress_bar(range(3), file=stream, disable=True) as bar:
        list(bar)
    assert stream.getvalue() == ""


def test_training_into_a_pipe_prints_its_lines_but_no_bar(tmp_path, capsys) -> None:
    from textok.cli import main

    args = ["train-tokenizer", "--config", "textok-tiny", "--out", str(tmp_path / "run"), "--max-steps", "60",
            "batch_size=2", "data.train_size=4", "data.val_size=2", "log_every=60", "ckpt_every=60"]
    assert main(["--threads", "1", *args]) == 0  # no --no-progress: capsys's stderr is not a terminal
    captured = capsys.readouterr()
    assert "step/s" not in captured.err and "train run" not in captured.err
    assert any(line.startswith("train run: about ") for line in captured.out.splitlines()), captured
