"""CFP: profiling-based intra-operator parallel plan search for PyTorch models."""

from cfp.capture import TracedModel, capture
from cfp.errors import CFPError
from cfp.spec import ModelSpec, Workload, build

# ``cfp.analyze``, ``cfp.profile``, ``cfp.solve``, ``cfp.plan`` and ``cfp.bench`` are the functions that
# mirror the CLI; their modules are reached with ``from cfp.solve import ...``.
from cfp.analyze import analyze  # noqa: E402
from cfp.plan import Plan, plan  # noqa: E402
from cfp.profile import profile  # noqa: E402
from cfp.solve import solve  # noqa: E402
from cfp.parallelize import parallelize  # noqa: E402
from cfp.bench import bench  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CFPError",
    "ModelSpec",
    "Plan",
    "analyze",
    "bench",
    "plan",
    "parallelize",
    "profile",
    "solve",
    "TracedModel",
    "Workload",
    "build",
    "capture",
    "__version__",
]
