"""User errors vs bugs on the command line: a config error is one line on stderr and exit status 2; a ValueError
raised deep inside a command (a bug, not the user's) propagates with its traceback instead of being reworded as a
user error (``lmfusion.errors``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lmfusion.cli import main
from lmfusion.errors import USER_ERRORS, UserError
from lmfusion.training import cli as training_cli
from tests.fixtures import REPO, TINY_CONFIG, config_only_base

BAD_CHOICE = "train.precision=fp16"
EXPECTED = "train.precision must be one of ('auto', 'bf16', 'fp32'), got 'fp16'"


def _flops_argv(base, *overrides: str) -> list[str]:
    return ["flops", "--synthetic", "--batches", "1", "--config", str(TINY_CONFIG), f"init.base_checkpoint={base}",
            *overrides]


def test_user_error_is_a_value_error_and_the_one_tuple():
    assert issubclass(UserError, ValueError)  # `except ValueError` callers keep working
    assert training_cli.USER_ERRORS is USER_ERRORS
    assert ValueError not in USER_ERRORS and AssertionError not in USER_ERRORS


def test_config_error_is_one_line(tmp_path, capsys):
    base = config_only_base(tmp_path)
    assert main(_flops_argv(base, BAD_CHOICE)) == 2
    err = capsys.readouterr().err
    assert err == f"lmfusion flops: error: {EXPECTED}\n"
    assert training_cli.run_training(str(TINY_CONFIG), [f"init.base_checkpoint={base}", BAD_CHOICE]) == 2
    assert capsys.readouterr().err == f"lmfusion train: error: {EXPECTED}\n"


def test_internal_value_error_propagates(tmp_path, monkeypatch, capsys):
    """A bug deep inside (here: the FLOP model, and building the trainer) is not swallowed as a user error."""
    from lmfusion.training import engines, flops

    def broken(*args, **kwargs):
        raise ValueError("routing invariant broken (internal)")

    base = config_only_base(tmp_path)
    assert main(_flops_argv(base)) == 0  # the command works as such
    capsys.readouterr()
    monkeypatch.setattr(flops, "compare", broken)
    with pytest.raises(ValueError, match="internal"):
        main(_flops_argv(base))
    monkeypatch.setattr(engines, "build_trainer", broken)
    with pytest.raises(ValueError, match="internal"):
        training_cli.run_training(str(TINY_CONFIG), [f"init.base_checkpoint={base}"])
    assert "error:" not in capsys.readouterr().err


def test_traceback_for_a_bug_one_line_for_a_config_error(tmp_path):
    """The same through a real process: stderr shows the traceback of the internal error, and exactly one line for
    the config error."""
    base = config_only_base(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from lmfusion.training import flops
        from lmfusion.cli import main

        def broken(*args, **kwargs):
            raise ValueError("routing invariant broken (internal)")

        if sys.argv[1] == "bug":
            flops.compare = broken
        sys.exit(main({_flops_argv(base)!r} + sys.argv[2:]))
    """)
    bug = subprocess.run([sys.executable, "-c", script, "bug"], capture_output=True, text=True, cwd=REPO)
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr
    assert "ValueError: routing invariant broken (internal)" in bug.stderr
    user = subprocess.run([sys.executable, "-c", script, "user", BAD_CHOICE], capture_output=True, text=True,
                          cwd=REPO)
    assert user.returncode == 2
    assert [line for line in user.stderr.splitlines() if "error" in line.lower() or "Traceback" in line] == \
        [f"lmfusion flops: error: {EXPECTED}"]
