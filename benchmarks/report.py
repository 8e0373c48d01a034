"""What every benchmark ends with: a JSON file, a PNG plot and a small table on stdout."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, RESULTS_ENV, ROOT


def results_dir() -> Path:
    """Where results go: ``$WISP_BENCH_RESULTS`` where set, else ``benchmarks/results``; made if missing."""
    path = Path(os.environ.get(RESULTS_ENV) or RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_worker(module: str, name: str) -> dict[str, Any]:
    """Runs ``python -m module --worker name`` with this run's arguments in a fresh process; returns its last
    JSON line.

    A process per configuration keeps threads, caches and allocator state from leaking between them. The child
    runs in this process's directory (relative paths in the arguments keep their meaning) with the repository
    root first on its ``PYTHONPATH``, so it imports ``benchmarks`` from wherever this one was started.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    child = subprocess.run(
        [sys.executable, "-m", module, "--worker", name, *sys.argv[1:]],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def write_json(name: str, payload: dict[str, Any]) -> Path:
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def save_plot(name: str, draw: Callable[..., None], *, ncols: int = 1, figsize: tuple[float, float] = (6, 4)) -> Path:
    """Draws a figure of ``ncols`` plots side by side with ``draw(*axes)`` and saves it as ``<results>/<name>.png``.

    The one place that sets matplotlib up (the Agg backend: no display needed), lays the figure out, saves it at
    120 dpi and closes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    try:
        draw(*axes[0])
        fig.tight_layout()
        path = results_dir() / f"{name}.png"
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
