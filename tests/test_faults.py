"""Injected faults (issue 15): each gets a clear error, leaves no process of the run behind and loses no row.

The faulty model is ``tests/faults.py:build``; runs carry a marker in their environment, so that every process
they started (workers, their helpers) can be found in /proc afterwards.
"""

import json
import re
import subprocess
import sys
import uuid

import pytest

import cfp
from cfp.cli import main
from cfp.errors import CFPError
from tests.faults import cfp_env, wait_for_no_survivors

FAULTY = "tests/faults.py:build"


def run_cfp(*args, timeout=180, **env):
    """``cfp ARGS`` in a fresh process; (result, marker)."""
    marker = uuid.uuid4().hex
    out = subprocess.run([sys.executable, "-m", "cfp.cli", *map(str, args)], capture_output=True, text=True,
                         env=cfp_env(marker, **env), timeout=timeout)
    return out, marker


# -- 1: the error printer ------------------------------------------------------------------------------------------

def test_brackets_in_an_error_are_printed_literally(capsys):
    assert main(["inspect", FAULTY, "--arg", "foo=[/bar]"]) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "foo=[/bar]" in out and "unexpected keyword" in out
    assert out.count("\n") == 1  # without a terminal, lines are not wrapped (nor tables cut) at 80 columns


@pytest.mark.parametrize("fault, says", [("exit", "Rank 1 died (exit code 1)"), ("raise", "Rank 1 failed")])
def test_the_rank_that_failed_is_named(fault, says, tmp_path):
    out, marker = run_cfp("profile", FAULTY, "--mesh", "2", "--store", tmp_path, "--arg", f"fault={fault}",
                          "--timeout", "60", "--no-transitions", "--warmup", "0", "--iters", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert says in out.stdout, out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    if fault == "raise":
        assert "injected failure [/bar]" in out.stdout
    assert not wait_for_no_survivors(marker)


# -- 2: sizes are validated before any work -------------------------------------------------------------------------

@pytest.mark.parametrize("model, args, says", [
    ("gpt:tiny", ["--batch", "0"], "--batch 0 is not a size"),
    ("gpt:tiny", ["--arg", "n_layer=-3"], "--arg n_layer=-3 is negative"),
    (FAULTY, ["--arg", "width=0"], "input 0 has shape (4, 0), with a zero-size dimension"),
])
def test_bad_sizes_are_refused_before_any_work(model, args, says, capsys):
    for command in (["inspect"], ["analyze", "--mesh", "2"]):
        assert main([command[0], model, *command[1:], *args]) == 1
        out = capsys.readouterr().out
        assert says in out, out


# -- 7: plans are validated against the model when loaded --------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    from cfp.plan import make_plan

    path = tmp_path_factory.mktemp("plan") / "plan.json"
    make_plan(cfp.ModelSpec("gpt:tiny", device="meta"), "2", cost="analytic", output=path)
    return path


def edited(plan_file, tmp_path, edit):
    data = json.loads(plan_file.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def shard_seven(data):
    data["parameters"]["transformer.h.0.mlp.c_fc.weight"] = ["Shard(7)"]


def rename_config(data):
    data["blocks"][3]["config"] = "expert"


@pytest.mark.parametrize("edit, says", [
    (shard_seven, "shards parameter transformer.h.0.mlp.c_fc.weight (shape (256, 64)) on dimension 7"),
    (rename_config, "has config 'expert', which this block does not offer"),
    (lambda d: d.update(schema_version="1"), "schema_version '1' (str); it must be the integer 1"),
    (lambda d: d["parameters"].update({"lm_head.weight": ["Shard(-1)"]}), "parameter lm_head.weight has placement 'Shard(-1)'"),
])
def test_edited_plans_are_refused_naming_what_is_wrong(plan_file, tmp_path, capsys, edit, says):
    path = edited(plan_file, tmp_path, edit)
    assert main(["report", str(path)]) == 1
    assert says in capsys.readouterr().out
    workload = cfp.build(cfp.ModelSpec("gpt:tiny", device="cpu"))
    with pytest.raises(CFPError, match=re.escape(says)):
        cfp.parallelize(workload.model, path, example_inputs=workload.inputs)
