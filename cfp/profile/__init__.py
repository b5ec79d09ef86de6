"""Profiling: block and transition programs timed on a real process group or
emulated over the fake one, stored as Parquet, read by the ILP as a cost model.

See ``cfp.profile.runner.profile`` (the entry point), ``cfp.profile.program``
(the programs), ``cfp.profile.store`` (``ProfileStore``, ``ProfileTable``),
``cfp.profile.backends`` (``Backend``, the registry ``BACKENDS``) and
``cfp.profile.real`` (the worker pool).
"""

from cfp.profile.backends import BACKENDS, Backend, register_backend
from cfp.profile.runner import DEFAULT_BACKEND, ProfileRun, analyze_for_profile, profile
from cfp.profile.store import ProfileStore, ProfileTable

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Backend",
    "ProfileRun",
    "ProfileStore",
    "ProfileTable",
    "analyze_for_profile",
    "profile",
    "register_backend",
]
