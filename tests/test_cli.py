"""The cfp command: help everywhere, clear errors, JSON for scripts."""

import json
import subprocess
import sys

import pytest

from cfp.cli import main, parser


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cfp.cli", *args], capture_output=True, text=True)


def test_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and "cfp" in out.stdout
    assert run_cli("--help").returncode == 0


def test_every_subcommand_has_help():
    subcommands = parser()._subparsers._group_actions[0].choices
    for name in subcommands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0


def test_inspect_writes_json(tmp_path):
    path = tmp_path / "inspect.json"
    assert main(["inspect", "gpt:tiny", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["parameters"] == 118528
    assert data["nodes"] > 0 and data["flops"] > 0


def test_bad_spec_exits_nonzero_without_traceback():
    out = run_cli("inspect", "nosuchfile.py:build")
    assert out.returncode == 1
    assert "does not exist" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
