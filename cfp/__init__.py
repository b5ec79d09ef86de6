"""CFP: profiling-based intra-operator parallel plan search for PyTorch models."""

# ``cfp.analyze``, ``cfp.profile``, ``cfp.solve``, ``cfp.plan`` and ``cfp.bench`` are the functions that
# mirror the CLI; their modules are reached with ``from cfp.solve import ...``.
from cfp.analyze import analyze
from cfp.bench import bench
from cfp.capture import TracedModel, capture
from cfp.errors import CFPError
from cfp.parallelize import parallelize
from cfp.pipeline import PlanOptions, make_plan, plan
from cfp.plan import Plan
from cfp.profile import profile
from cfp.solve import solve
from cfp.spec import ModelSpec, Workload, build
from cfp.version import __version__

__all__ = [
    "CFPError",
    "ModelSpec",
    "Plan",
    "PlanOptions",
    "analyze",
    "bench",
    "plan",
    "make_plan",
    "parallelize",
    "profile",
    "solve",
    "TracedModel",
    "Workload",
    "build",
    "capture",
    "__version__",
]
