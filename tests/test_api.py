"""The Python API mirrors the CLI, stage by stage, as the README shows."""

import cfp
from cfp.cluster import load_cluster


def test_stage_by_stage_api(tmp_path, monkeypatch):
    monkeypatch.setenv("CFP_PROFILE_DIR", str(tmp_path))
    workload = cfp.build(cfp.ModelSpec("gpt:tiny", device="meta", args={"n_layer": 1}))
    traced = cfp.capture(workload)
    graph = cfp.analyze(traced, "2")
    run = cfp.profile(graph, workload.spec, backend="emulated", cluster=load_cluster("h100-nvlink-8"))
    assert run.jobs > 0
    solution = cfp.solve(graph, run.table, memory_limit=40 * 2**30)
    assert solution.status == "OPTIMAL"
    assert solution.evaluation.total_s > 0
