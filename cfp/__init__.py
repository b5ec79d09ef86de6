"""CFP: profiling-based intra-operator parallel plan search for PyTorch models."""

from cfp.capture import TracedModel, capture
from cfp.errors import CFPError
from cfp.spec import ModelSpec, Workload, build

__version__ = "0.1.0"

__all__ = ["CFPError", "ModelSpec", "TracedModel", "Workload", "build", "capture", "__version__"]
