"""Small formatting helpers shared by the terminal reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def human(n: float, unit: str = "") -> str:
    """1.5e9 -> '1.50 G' (decimal prefixes, for counts and FLOPs)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def human_bytes(n: float) -> str:
    for prefix, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{n:.0f} B"


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    """Write what a command reported, for scripts (the --json FILE option)."""
    from cfp.mesh import launched_rank

    if path is None or launched_rank() != 0:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
