"""The ``ttspec`` command as a user meets it: help for every subcommand, and bad input refused
with one line naming it (exit status 2, no traceback, nothing left behind)."""

from __future__ import annotations

import pytest

from ttspec_ros import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_prints_its_help(command, capsys):
    # make-bag's help once raised: a "90 %" in a help string is a format directive to argparse
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: ttspec {command}" in capsys.readouterr().out
