"""What kind of device an edge runs on: detected on the edge, reported in `DeviceInfo.kind`.

The server puts the kind in logs and metric labels. Labels must come from a
fixed set (a device could otherwise grow the metrics' cardinality without
bound), so `label_of` maps anything outside `KINDS` to ``other``.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("jetson-orin-nano", "jetson", "raspberry-pi-5", "raspberry-pi", "laptop", "server")
OTHER = "other"

_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def detect(tegra_release: Path = _TEGRA_RELEASE, device_tree_model: Path = _DEVICE_TREE_MODEL) -> str:
    """The kind of this machine: from the device tree on boards (Jetson, Raspberry Pi), else ``laptop``."""
    model = _read(device_tree_model).lower()
    if "jetson" in model or "nvidia" in model or tegra_release.exists():
        return "jetson-orin-nano" if "orin nano" in model else "jetson"
    if "raspberry pi 5" in model:
        return "raspberry-pi-5"
    if "raspberry pi" in model:
        return "raspberry-pi"
    return "laptop"


def label_of(kind: str) -> str:
    """A metric label value: one of `KINDS`, or ``other``."""
    return kind if kind in KINDS else OTHER


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").rstrip("\x00\n")
    except OSError:
        return ""
