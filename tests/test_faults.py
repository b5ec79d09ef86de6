"""Injected faults (issue 15): each gets a clear error, leaves no process of the run behind and loses no row.

The faulty model is ``tests/faults.py:build``; runs carry a marker in their environment, so that every process
they started (workers, their helpers) can be found in /proc afterwards.
"""

import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import cfp
from cfp.cli import main
from cfp.cluster import load_cluster
from cfp.errors import CFPError
from cfp.mesh import parse_mesh
from cfp.pipeline import make_plan
from cfp.profile import ProfileStore, analyze_for_profile, profile
from cfp.profile.real import remove_stale_dirs
from cfp.profile.store import SCHEMA, StoreWarning
from tests.faults import cfp_env, read_only, survivors, wait_for_no_survivors

FAULTY = "tests/faults.py:build"


def run_cfp(*args, timeout=180, **env):
    """``cfp ARGS`` in a fresh process; (result, marker)."""
    marker = uuid.uuid4().hex
    out = subprocess.run(
        [sys.executable, "-m", "cfp.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=cfp_env(marker, **env),
        timeout=timeout,
        check=False,
    )
    return out, marker


# -- 1: the error printer ------------------------------------------------------------------------------------------


def test_brackets_in_an_error_are_printed_literally(capsys):
    assert main(["inspect", FAULTY, "--arg", "foo=[/bar]"]) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "foo=[/bar]" in out and "unexpected keyword" in out
    assert out.count("\n") == 1  # without a terminal, lines are not wrapped (nor tables cut) at 80 columns


def test_the_rank_that_died_is_named(tmp_path):
    """Rank 1 exits in the model's op; rank 0's connection error (with '[/...]' in it) often arrives first."""
    out, marker = run_cfp(
        "profile",
        FAULTY,
        "--mesh",
        "2",
        "--store",
        tmp_path,
        "--arg",
        "fault=exit",
        "--timeout",
        "60",
        "--no-transitions",
        "--warmup",
        "0",
        "--iters",
        "1",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "error: Rank 1 died (exit code 1) while profiling block class" in out.stdout, out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    assert not wait_for_no_survivors(marker)
    kept = stored_rows(tmp_path)  # the first block's jobs, measured before the fault
    assert len(kept) >= 2 and kept["class_id"].nunique() == 1 and (kept["status"] == "ok").all()


# -- 2: sizes are validated before any work -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, args, says",
    [
        ("gpt:tiny", ["--batch", "0"], "--batch 0 is not a size"),
        ("gpt:tiny", ["--arg", "n_layer=-3"], "--arg n_layer=-3 is negative"),
        (FAULTY, ["--arg", "width=0"], "input 0 has shape (4, 0), with a zero-size dimension"),
    ],
)
def test_bad_sizes_are_refused_before_any_work(model, args, says, capsys):
    for command in (["inspect"], ["analyze", "--mesh", "2"]):
        assert main([command[0], model, *command[1:], *args]) == 1
        out = capsys.readouterr().out
        assert says in out, out


# -- 7: plans are validated against the model when loaded --------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
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


@pytest.mark.parametrize(
    "edit, says",
    [
        (shard_seven, "shards parameter transformer.h.0.mlp.c_fc.weight (shape (256, 64)) on dimension 7"),
        (rename_config, "has config 'expert', which this block does not offer"),
        (lambda d: d.update(schema_version="1"), "schema_version '1' (str); it must be the integer 1"),
        (
            lambda d: d["parameters"].update({"lm_head.weight": ["Shard(-1)"]}),
            "parameter lm_head.weight has placement 'Shard(-1)'",
        ),
    ],
)
def test_edited_plans_are_refused_naming_what_is_wrong(plan_file, tmp_path, capsys, edit, says):
    path = edited(plan_file, tmp_path, edit)
    assert main(["report", str(path)]) == 1
    assert says in capsys.readouterr().out
    workload = cfp.build(cfp.ModelSpec("gpt:tiny", device="cpu"))
    with pytest.raises(CFPError, match=re.escape(says)):
        cfp.parallelize(workload.model, path, example_inputs=workload.inputs)


# -- 5, 3: the store keeps its rows valid, takes turns between runs, and refuses what it could not keep ----------------

EMULATED = ["--mesh", "2", "--backend", "emulated", "--cluster", "h100-nvlink-8", "--warmup", "0", "--iters", "1"]


def stored_rows(store) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        return ProfileStore(store).frame


def test_invalid_rows_are_remeasured_and_never_reach_a_plan(tmp_path):
    spec = cfp.ModelSpec(FAULTY, device="cpu")
    graph = analyze_for_profile(spec, parse_mesh("2"))
    cluster = load_cluster("h100-nvlink-8")
    first = profile(graph, spec, "emulated", cluster, tmp_path, warmup=0, iters=1)
    for part in (tmp_path / "blocks").glob("*.parquet"):
        df = pd.read_parquet(part)
        df.loc[0, "total_s"], df.loc[1, "backward_s"] = math.nan, -1.0
        df.to_parquet(part, index=False)
    with pytest.warns(StoreWarning, match="2 rows marked ok have timings that are NaN, infinite or negative"):
        again = profile(graph, spec, "emulated", cluster, tmp_path, warmup=0, iters=1)
    assert again.measured == 2 and again.cached == first.jobs - 2
    assert np.isfinite(again.table.rows["total_s"]).all()
    plan = make_plan(graph.traced, "2", cost="analytic", graph=graph, costs=again.table)[0]
    plan.predicted_step_time_s = math.nan
    with pytest.raises(CFPError, match="non-finite numbers \\(predicted_step_time_s = nan\\)"):
        plan.save(tmp_path / "plan.json")
    assert not (tmp_path / "plan.json").exists()


def test_two_runs_on_one_store_take_turns(tmp_path):
    store = tmp_path / "store"
    # Many parts from another mesh, so that a run compacts them while the other reads.
    filler = ProfileStore(store, flush_every_s=0)
    for i in range(40):
        filler.add(
            {
                "kind": "block",
                "class_id": f"other{i}",
                "config": "rep",
                "shape_key": "[]",
                "mesh": "9",
                "device_kind": "cpu",
                "backend": "emulated",
                "cluster": "",
                "dtype": "float32",
                "torch_version": torch.__version__,
                "schema": SCHEMA,
                "status": "ok",
                "total_s": 1e-3,
            }
        )
    marker = uuid.uuid4().hex
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cfp.cli",
                "profile",
                FAULTY,
                *EMULATED,
                "--store",
                str(store),
                "--json",
                str(tmp_path / f"run{i}.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cfp_env(marker),
        )
        for i in range(2)
    ]
    outs = [r.communicate(timeout=240)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    results = [json.loads((tmp_path / f"run{i}.json").read_text()) for i in range(2)]
    assert sum(r["measured"] for r in results) == results[0]["jobs"]  # every job measured once, by one run
    rows = stored_rows(store)
    assert len(rows) == 40 + results[0]["jobs"]  # nothing lost, the filler included
    assert len(list((store / "blocks").glob("*.parquet"))) <= 33


def test_a_store_that_cannot_keep_rows_is_refused_before_measuring(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    assert main(["profile", FAULTY, *EMULATED, "--store", str(afile)]) == 1
    out = capsys.readouterr().out
    assert f"Profile store {afile} is a file, not a directory" in out and "need measuring" in out
    # A read-only store with a corrupt file and rows missing: nothing is measured, nothing is lost.
    store = tmp_path / "store"
    (store / "blocks").mkdir(parents=True)
    (store / "blocks" / "part-bad.parquet").write_bytes(b"not parquet")
    with read_only(store):
        assert main(["profile", FAULTY, *EMULATED, "--store", str(store)]) == 1
        out = capsys.readouterr().out
        assert "cannot be read" in out and "left in place" in out
        assert "is not writable" in out and "nothing was measured" in out
    assert (store / "blocks" / "part-bad.parquet").exists()


# -- 4: no process of a run survives it -------------------------------------------------------------------------------


def start_cfp(*args, **env):
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfp.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cfp_env(marker, **env),
    )
    return proc, marker


def wait_for(path, proc, within_s=120):
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.communicate()[0] if proc.poll() is not None else "timed out"
        )
        time.sleep(0.2)


def test_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of the parent while rank 1 sleeps in the model's op and rank 0 waits for it in a collective."""
    reached = tmp_path / "reached"
    proc, marker = start_cfp(
        "profile",
        FAULTY,
        "--mesh",
        "2",
        "--store",
        tmp_path,
        "--arg",
        "fault=sleep",
        "--arg",
        f"touch={reached}",
        "--no-transitions",
        "--warmup",
        "0",
        "--iters",
        "1",
    )
    wait_for(reached, proc)
    pg_dirs = list(Path(tempfile.gettempdir()).glob(f"cfp-pg-{proc.pid}-*"))
    assert pg_dirs
    proc.kill()
    proc.wait()
    assert not wait_for_no_survivors(marker)
    # The FileStore directory the killed parent could not remove goes when the next pool starts on this host.
    remove_stale_dirs()
    assert not any(d.exists() for d in pg_dirs)


def test_timeout_covers_worker_start_up(tmp_path):
    start = time.monotonic()
    out, marker = run_cfp(
        "profile", FAULTY, "--mesh", "2", "--store", tmp_path, "--arg", "fault=startup", "--timeout", "15"
    )
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert time.monotonic() - start < 150  # not the fixed 600 s start-up limit
    # Rank 1 hangs in its own start-up; rank 0 waits for it to join (when a loaded host lets it get that far in 15 s).
    assert re.search(r"Rank\(s\) \[(0, )?1\] did not finish starting the worker pool within 15 s", out.stdout), (
        out.stdout
    )
    assert not wait_for_no_survivors(marker)


def test_sigterm_stops_analysis_workers(tmp_path):
    proc, marker = start_cfp(
        "analyze", "gpt:tiny", "--mesh", "2x2", CFP_CACHE_DIR=str(tmp_path)
    )  # empty cache: workers
    deadline = time.monotonic() + 120
    while len(survivors(marker)) < 2:  # the command and at least one forked analysis worker
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(timeout=60) != 0
    assert not wait_for_no_survivors(marker)


SIGTERM_DURING_FORK = """
import os, signal, time
from cfp.children import exit_on_sigterm
exit_on_sigterm()
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))
if os.fork() == 0:
    os._exit(0)
os.wait()
time.sleep(60)
"""


def test_sigterm_during_a_fork_is_not_lost():
    # Python ignores exceptions raised in at-fork hooks: a SIGTERM that arrived while Pool forked an analysis worker
    # raised its SystemExit in logging's hook, and `cfp analyze` ran on (test_sigterm_stops_analysis_workers hung).
    out = subprocess.run([sys.executable, "-c", SIGTERM_DURING_FORK], capture_output=True, text=True, timeout=50)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr


WATCHDOG_MASK = """
import os, threading, time
from cfp.children import die_with_parent
die_with_parent(os.getppid())
watchdog = next(t for t in threading.enumerate() if t.name == "cfp-parent-watchdog")
status = open(f"/proc/self/task/{watchdog.native_id}/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a thread's signal mask from Linux's /proc")
def test_the_parent_watchdog_leaves_sigterm_to_the_main_thread():
    # A SIGTERM delivered to the watchdog thread would not wake a main thread blocked in a lock: a forked analysis
    # worker waiting for work then outlived Pool.terminate and the test suite hung on it.
    out = subprocess.run([sys.executable, "-c", WATCHDOG_MASK], capture_output=True, text=True, check=True)
    blocked = int(out.stdout.strip(), 16)
    for sig in (signal.SIGTERM, signal.SIGINT):
        assert blocked & (1 << (sig - 1)), f"the watchdog thread does not block {sig.name}"


# -- 6: oversubscription is said, and noisy rows flagged -------------------------------------------------------------


def test_more_ranks_than_cores_is_warned_about(monkeypatch):
    real = sys.modules["cfp.profile.real"]  # cfp.profile is also the name of a function
    monkeypatch.setattr(real, "cpu_cores", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        real.check_oversubscription(parse_mesh("2"), "cpu")
    with pytest.warns(real.OversubscribedWarning, match="8 CPU ranks on 2 core"):
        real.check_oversubscription(parse_mesh("2x4"), "cpu")


def test_noisy_rows_are_flagged(tmp_path, capsys):
    assert main(["profile", FAULTY, *EMULATED, "--store", str(tmp_path), "--no-transitions"]) == 0
    capsys.readouterr()
    for part in (tmp_path / "blocks").glob("*.parquet"):
        df = pd.read_parquet(part)
        df.loc[0, "total_iqr_s"] = df.loc[0, "total_s"]  # spread as large as the median, as on 8 ranks on 2 cores
        df.to_parquet(part, index=False)
    assert main(["profile", FAULTY, *EMULATED, "--store", str(tmp_path), "--no-transitions"]) == 0
    out = capsys.readouterr().out
    assert "warning: 1 of" in out and "too noisy to trust" in out
    assert "ok (noisy)" in out


# -- 8: errors without noise ------------------------------------------------------------------------------------------


def test_an_untraceable_model_gets_one_paragraph(capfd):
    assert main(["inspect", "tests/faults.py:build_untraceable"]) == 1
    out, err = capfd.readouterr()
    assert "cannot be traced by torch.export" in out
    assert (out + err).strip().count("\n") == 0, out + err


def test_train_py_says_a_bad_plan_once(plan_file, tmp_path):
    path = edited(plan_file, tmp_path, shard_seven)
    marker = uuid.uuid4().hex
    out = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", "examples/train.py", "--plan", str(path), "--steps", "1"],
        capture_output=True,
        text=True,
        env=cfp_env(marker),
        timeout=180,
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert text.count("shards parameter transformer.h.0.mlp.c_fc.weight") == 1, text
    assert "[rank0]" not in text and "[rank1]" not in text  # no per-rank tracebacks
    assert not wait_for_no_survivors(marker)


def test_analysis_progress_counts_configs(tmp_path, monkeypatch):
    """Progress (and so an ETA) moves config by config, in the forked workers too, not once per block class."""
    monkeypatch.setenv("CFP_CACHE_DIR", str(tmp_path))
    traced = cfp.capture(cfp.build(cfp.ModelSpec(FAULTY, device="meta")))
    for workers in (1, 2):
        calls = []
        graph = cfp.analyze(
            traced, "2", progress=lambda done, total, calls=calls: calls.append((done, total)), workers=workers
        )
        total = sum(len(graph.strategies[c]) + len(graph.rejected[c]) for c in graph.classes)
        assert calls[0] == (0, total) and calls[-1] == (total, total)
        assert len(calls) == total + 1 > len(graph.classes) + 1
        monkeypatch.setenv("CFP_CACHE_DIR", str(tmp_path / "again"))


def test_a_mesh_nothing_divides_is_said(capsys):
    assert main(["analyze", FAULTY, "--mesh", "3"]) == 0  # batch 4, width 8: nothing divides by 3
    assert "warning: Nothing in this model can be sharded across mesh dimension" in capsys.readouterr().out
    assert main(["analyze", FAULTY, "--mesh", "2"]) == 0
    assert "Nothing in this model" not in capsys.readouterr().out


def test_plan_reports_analysis_progress(tmp_path, monkeypatch, capsys):
    """`cfp plan` passes analysis progress on (a long analysis shows how far it is), through make_plan's on_analysis."""
    monkeypatch.setenv("CFP_CACHE_DIR", str(tmp_path))
    calls = []
    cfp.plan(FAULTY, "2", cost="analytic", on_analysis=lambda done, total: calls.append((done, total)))
    assert calls and calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0


def test_analysis_after_a_real_process_group_says_why_instead_of_hanging(tmp_path, monkeypatch):
    """Analysis makes its own fake process group. Under a real one (a rank that analyses after
    init_process_group, with nothing cached), a forked worker's initializer used to fail and the pool
    retried it forever; the error is now raised before any worker starts."""
    import torch.distributed as dist
    from ranks import free_port

    from cfp.analyze import analyze

    monkeypatch.setenv("CFP_CACHE_DIR", str(tmp_path / "cache"))
    port = free_port()
    traced = cfp.capture(cfp.build(cfp.ModelSpec("gpt:tiny", device="meta")))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        start = time.monotonic()
        with pytest.raises(CFPError, match="analyse before init_process_group"):
            analyze(traced, parse_mesh("2"), workers=2)
        assert time.monotonic() - start < 30
    finally:
        dist.destroy_process_group()
    assert len(analyze(traced, parse_mesh("2"), workers=2).blocks) > 0  # and works once the group is gone
