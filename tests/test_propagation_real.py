"""BlockStrategy on meta tensors over the fake process group predicts what real
DTensor execution does on a 2-rank gloo group: the same exit placements and
the same collectives, forward and backward."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cfp
from cfp.analyze import analyze
from cfp.mesh import device_mesh, parse_mesh
from cfp.placements import replicate_partials, to_strs
from cfp.program import CommRecorder, make_dtensor, run_block
from cfp.propagate import input_values, reduce_gradients
from cfp.spec import ModelSpec

SPEC = ModelSpec("gpt:tiny", batch=2, device="meta")
MESH = parse_mesh("2")


def _graph():
    return analyze(cfp.capture(cfp.build(SPEC)), MESH, workers=1)


def _signature(prop_or_run):
    """What is compared: exit placements and collective kinds per phase."""
    exits, collectives = prop_or_run
    kinds = {phase: sorted(c.kind for c in collectives if c.phase == phase) for phase in ("forward", "backward")}
    return [to_strs(p) for p in exits], kinds


def _run_real(graph, mesh):
    """Each class's configs run for real: random CPU data, gloo collectives."""
    observed = {}
    for class_id, strategies in graph.strategies.items():
        block = graph.blocks[graph.classes[class_id][0]]
        nodes = [graph.traced.nodes[n] for n in block.nodes]
        activation = next(i.name for i in block.inputs if i.role == "activation")
        for strategy in strategies:
            torch.manual_seed(0)

            def make_input(node, placements):
                val = node.meta["val"]
                if val.dtype.is_floating_point:
                    data = torch.randn(val.shape, dtype=val.dtype)
                elif val.dtype == torch.bool:
                    data = torch.ones(val.shape, dtype=torch.bool).tril()
                else:
                    data = torch.randint(0, 8, val.shape, dtype=val.dtype)
                return make_dtensor(data, mesh, placements, requires_grad=True)

            entry = {activation: strategy.config.activation, **strategy.config.placements()}
            forward = CommRecorder(mesh, "forward")
            with forward:
                run = run_block(nodes, mesh, entry, make_input, recorder=forward)
            outs = [run.values[o] for o in block.outputs]
            grads = [
                make_dtensor(torch.randn(o.shape), mesh, replicate_partials(o.placements), False)
                for o in outs
                if o.requires_grad
            ]
            backward = CommRecorder(mesh, "backward")
            with backward:
                torch.autograd.backward([o for o in outs if o.requires_grad], grads)
                reduce_gradients(input_values(block, run.values), mesh, backward)
            exits = [tuple(o.placements) for o in outs]
            observed[(class_id, strategy.config.name)] = _signature((exits, forward.collectives + backward.collectives))
    return observed


def _worker(rank, port, queue):
    torch.set_num_threads(1)
    graph = _graph()  # analysis first: it needs its own (fake) process group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=MESH.size)
    try:
        observed = _run_real(graph, device_mesh(MESH))
        if rank == 0:
            queue.put(observed)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_meta_propagation_matches_real_gloo_execution():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(MESH.size)]
    for p in procs:
        p.start()
    observed = queue.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    graph = _graph()
    predicted = {
        (class_id, p.config.name): _signature((p.exit_placements, p.collectives))
        for class_id, strategies in graph.strategies.items()
        for p in strategies
    }
    assert len(predicted) >= 25
    for key, signature in predicted.items():
        assert observed[key] == signature, key
