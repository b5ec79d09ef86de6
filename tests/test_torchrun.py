"""What runs under torchrun (2 gloo ranks on this host): examples/train.py trains under a plan
file and the loss falls; `cfp profile` uses the torchrun job's process group as its real backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cfp.cli import main

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT, env=env)


def test_train_with_a_plan_file_lowers_the_loss(tmp_path):
    plan = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "gpt:tiny",
                "--mesh",
                "2",
                "--cost",
                "analytic",
                "--cluster",
                "cpu-gloo-local",
                "--baseline",
                "megatron",
                "-o",
                str(plan),
            ]
        )
        == 0
    )
    curve_file = tmp_path / "curve.json"
    out = torchrun(
        2, str(ROOT / "examples" / "train.py"), "--plan", str(plan), "--steps", "20", "--json", str(curve_file)
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    curve = json.loads(curve_file.read_text())
    losses = [c["loss"] for c in curve]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    assert "loss" in out.stdout and "median step" in out.stdout


def test_train_meta_materialises_the_single_device_model(tmp_path):
    """--meta: the model is built on meta and each rank materialises its shards; the first loss is the
    single-device model's on the same batch, so the weights are the same."""
    import torch

    import cfp
    from cfp.parallelize import spec_of
    from examples.train import synthetic_batch

    plan = tmp_path / "plan.json"
    args = ["plan", "gpt:tiny", "--mesh", "2", "--cost", "analytic", "--cluster", "cpu-gloo-local"]
    assert main([*args, "--baseline", "megatron", "-o", str(plan)]) == 0
    curve_file = tmp_path / "curve.json"
    out = torchrun(
        2, str(ROOT / "examples" / "train.py"), "--plan", str(plan), "--meta", "--steps", "2", "--json", str(curve_file)
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    w = cfp.build(spec_of(cfp.Plan.load(plan)))
    expected = w.model(*synthetic_batch(w.inputs, 16, torch.Generator().manual_seed(0))).item()
    assert abs(json.loads(curve_file.read_text())[0]["loss"] - expected) < 1e-5


def test_train_refuses_a_plan_for_another_world_size(tmp_path):
    plan = tmp_path / "plan.json"
    assert (
        main(["plan", "gpt:tiny", "--mesh", "2", "--cost", "analytic", "--cluster", "cpu-gloo-local", "-o", str(plan)])
        == 0
    )
    out = torchrun(1, str(ROOT / "examples" / "train.py"), "--plan", str(plan), "--steps", "1")
    assert out.returncode != 0
    assert "needs 2 ranks; this run has 1" in out.stderr


def test_profile_under_torchrun(tmp_path):
    """Every rank runs `cfp profile`; rank 0 reports and stores, and the rows serve the pool backend too."""
    from cfp.mesh import parse_mesh
    from cfp.profile import ProfileStore, analyze_for_profile, profile
    from cfp.spec import ModelSpec

    store, summary = tmp_path / "store", tmp_path / "profile.json"
    out = torchrun(
        2, "-m", "cfp.cli", "profile", "gpt:tiny", "--mesh", "2", "--store", str(store), "--json", str(summary)
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    data = json.loads(summary.read_text())
    assert data["jobs"] == data["measured"] > 0 and data["cached"] == 0
    assert out.stdout.count(" jobs: ") == 1  # only rank 0 reports
    spec = ModelSpec("gpt:tiny", device="cpu")
    again = profile(analyze_for_profile(spec, parse_mesh("2")), spec, backend="real", store=ProfileStore(store))
    assert again.measured == 0 and again.cached == data["jobs"]


def test_profile_under_torchrun_refuses_another_mesh_size(tmp_path):
    """Every rank says why: torchrun stops rank 0 as soon as rank 1 exits, which may be before rank 0 prints."""
    out = torchrun(2, "-m", "cfp.cli", "profile", "gpt:tiny", "--mesh", "4", "--store", str(tmp_path))
    assert out.returncode != 0
    assert "needs 4 ranks; this torchrun job has 2" in out.stdout, out.stdout + out.stderr[-2000:]
