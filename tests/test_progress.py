"""The progress bar of ``score`` on a folder and ``evaluate``: on a terminal's stderr, nowhere else."""

from __future__ import annotations

import io
import sys

import pytest

from worker.serving.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_values_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress(3, "scoring") as tick:
        assert [tick(value) for value in "abc"] == ["a", "b", "c"]
    assert "scoring" in terminal.getvalue() and "/3 " in terminal.getvalue()


def test_a_pipe_gets_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress(3, "scoring") as tick:
        assert tick(1) == 1
    assert pipe.getvalue() == ""
