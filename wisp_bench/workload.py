"""What the emulated fleet asks for, and when: prompts with their categories, arrival processes, device fleets and
per-class SLOs. Everything random here is drawn from a `random.Random` seeded by the caller, so a seed fixes the
whole workload: the same seed gives the same prompts, in the same order, on the same devices, at the same times.

* Prompts: plain JSONL (``prompt``), MT-Bench (``turns``, ``category``), Spec-Bench (``question_id``,
  ``category``, ``turns``: MT-Bench's shape) and ShareGPT (``conversations``, JSONL or one JSON list). The first
  turn is the prompt, as everywhere in WISP (`wisp_common.prompts`).
* Arrivals: **closed loop** (each device runs one session after another, with an optional think time between) or
  **open loop** at a rate, with Gamma inter-arrival times as ``vllm bench serve --burstiness`` draws them
  (shape = burstiness, mean = 1 / rate; burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular).
* Fleets: ``"laptop:4,jetson-orin-nano:8"``: device ids ``laptop-0`` .. ``laptop-3``, ``jetson-orin-nano-0`` ..
* SLOs per device class: ``"laptop=2.0/0.1,jetson-orin-nano=3.0/0.15"`` (TTFT / TPOT seconds), ``default=`` or
  `DEFAULT_SLO` for the classes not listed.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from wisp_bench import MT_BENCH
from wisp_bench.profiles import DeviceProfile, load_profiles
from wisp_common.prompts import prompt_of
from wisp_common.request import Slo

# MT-Bench's 80 questions (Apache-2.0), in the repository: a checkout's default prompt file.
DEFAULT_SLO = Slo(ttft_seconds=2.0, tpot_seconds=0.25)  # the edge daemon's defaults (EdgeConfig.ttft_slo/tpot_slo)


# --- prompts ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A prompt's first-turn text, its category ("" where the file has none) and its record's index in the file."""

    text: str
    category: str
    index: int


def load_workload_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """The prompts of a JSONL file (``prompt``, ``turns`` or ``conversations`` per record) or a ShareGPT JSON list,
    in file order, with their ``category`` where the record has one. Records without a prompt are skipped (their
    index stays unused); ``limit`` keeps the first prompts."""
    path = Path(path) if path is not None else MT_BENCH
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSONL or a JSON list: {error}") from error
    prompts = []
    for index, record in enumerate(records):
        prompt = prompt_of(record) if isinstance(record, dict) else None
        if prompt:
            category = record.get("category")
            prompts.append(Prompt(prompt, category if isinstance(category, str) else "", index))
    if not prompts:
        raise ValueError(f"{path}: no prompts found (expected 'prompt', 'turns' or 'conversations' fields)")
    return prompts[:limit]


def prompt_sequence(prompts: list[Prompt], count: int, rng: random.Random) -> list[Prompt]:
    """``count`` prompts in a seeded order: shuffled passes over all of them, so each is used once per pass."""
    if not prompts:
        raise ValueError("no prompts to draw from")
    out: list[Prompt] = []
    while len(out) < count:
        order = list(prompts)
        rng.shuffle(order)
        out += order[: count - len(out)]
    return out


# --- arrivals ---------------------------------------------------------------------------------------------------


def interarrival_times(rate: float, count: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``count`` gaps between arrivals, Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate, variance
    1/(burstiness*rate^2). ``rate`` inf: all zero (everything at once)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second, got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(count)]


def arrival_times(rate: float, count: int, burstiness: float = 1.0, seed: int = 0, start: float = 0.0) -> list[float]:
    """Open-loop arrival times (seconds from ``start``) of ``count`` requests: the first one gap after ``start``."""
    times, now = [], start
    for gap in interarrival_times(rate, count, burstiness, seed):
        now += gap
        times.append(now)
    return times


def think_times(mean_seconds: float, count: int, rng: random.Random, exponential: bool = True) -> list[float]:
    """Closed-loop pauses between a device's sessions: exponential with ``mean_seconds`` (or fixed at it)."""
    if mean_seconds < 0:
        raise ValueError(f"think time must be >= 0, got {mean_seconds}")
    if mean_seconds == 0 or not exponential:
        return [float(mean_seconds)] * count
    return [rng.expovariate(1.0 / mean_seconds) for _ in range(count)]


# --- fleets and SLOs --------------------------------------------------------------------------------------------


class Device(NamedTuple):
    device_id: str
    profile: DeviceProfile


@dataclass(frozen=True)
class FleetSpec:
    """Device classes and how many of each, in the order given."""

    classes: tuple[tuple[str, int], ...]
    profiles: dict[str, DeviceProfile] = field(hash=False, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str, profiles: dict[str, DeviceProfile] | None = None) -> FleetSpec:
        """``"laptop:4,jetson-orin-nano:8"``; profile names from ``profiles`` (default: the packaged ones)."""
        profiles = load_profiles() if profiles is None else profiles
        classes: list[tuple[str, int]] = []
        for part in _parts(text, "fleet"):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*:\s*(\d+)", part)
            if not match:
                raise ValueError(f"fleet entry {part!r}: expected PROFILE:COUNT, e.g. 'laptop:4'")
            name, count = match.group(1), int(match.group(2))
            if name not in profiles:
                known = ", ".join(sorted(profiles))
                raise ValueError(f"fleet entry {part!r}: unknown profile {name!r}; known: {known}")
            if count < 1:
                raise ValueError(f"fleet entry {part!r}: the count must be at least 1")
            if any(name == seen for seen, _ in classes):
                raise ValueError(f"fleet {text!r}: {name!r} is listed twice")
            classes.append((name, count))
        return cls(tuple(classes), dict(profiles))

    @property
    def devices(self) -> list[Device]:
        """One per device: ids ``<profile>-<i>``, stable for a given spec."""
        return [Device(f"{name}-{i}", self.profiles[name]) for name, count in self.classes for i in range(count)]

    def __len__(self) -> int:
        return sum(count for _, count in self.classes)


@dataclass(frozen=True)
class SloSpec:
    """TTFT/TPOT targets per device class, and a default for the rest."""

    by_class: dict[str, Slo] = field(hash=False)
    default: Slo = DEFAULT_SLO

    @classmethod
    def parse(cls, text: str, default: Slo = DEFAULT_SLO, known: set[str] | None = None) -> SloSpec:
        """``"laptop=2.0/0.1,jetson-orin-nano=3.0/0.15"``; an entry ``default=TTFT/TPOT`` replaces ``default``.
        An empty string: ``default`` for everyone. ``known``: the class names allowed (None: any)."""
        by_class: dict[str, Slo] = {}
        seen: set[str] = set()
        for part in _parts(text, "SLO", allow_empty=True):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*=\s*([^/\s]+)\s*/\s*(\S+)", part)
            if not match:
                raise ValueError(f"SLO entry {part!r}: expected CLASS=TTFT/TPOT in seconds, e.g. 'laptop=2.0/0.1'")
            name = match.group(1)
            try:
                ttft, tpot = float(match.group(2)), float(match.group(3))
            except ValueError:
                raise ValueError(f"SLO entry {part!r}: TTFT and TPOT must be numbers of seconds") from None
            if not (ttft > 0 and tpot > 0 and math.isfinite(ttft) and math.isfinite(tpot)):
                raise ValueError(f"SLO entry {part!r}: TTFT and TPOT must be positive seconds")
            if name in seen:
                raise ValueError(f"SLO {text!r}: {name!r} is listed twice")
            seen.add(name)
            if name == "default":
                default = Slo(ttft, tpot)
                continue
            if known is not None and name not in known:
                names = ", ".join(sorted(known))
                raise ValueError(f"SLO entry {part!r}: unknown device class {name!r}; known: {names}")
            by_class[name] = Slo(ttft, tpot)
        return cls(by_class, default)

    def for_class(self, name: str) -> Slo:
        return self.by_class.get(name, self.default)


def _parts(text: str, what: str, allow_empty: bool = False) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if parts == [""] and allow_empty:
        return []
    if any(not part for part in parts):
        raise ValueError(f"{what} spec {text!r}: empty entry (expected comma-separated entries)")
    return parts


# --- plans: who sends what, when --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One open-loop request: when it is sent (seconds from the start), from which device, with which prompt."""

    time: float
    device: Device
    prompt: Prompt


def open_loop_plan(
    fleet: FleetSpec, prompts: list[Prompt], rate: float, count: int, burstiness: float = 1.0, seed: int = 0
) -> list[Arrival]:
    """``count`` arrivals at ``rate`` per second (fleet-wide), each from a device drawn uniformly from the fleet,
    each with the next prompt of a seeded shuffled sequence. A device drawn while its previous session still runs
    is the runner's business (queue it or run both)."""
    rng = random.Random(f"wisp-bench/open/{seed}")
    devices = fleet.devices
    times = arrival_times(rate, count, burstiness, seed)
    chosen = [rng.choice(devices) for _ in range(count)]
    return [Arrival(t, d, p) for t, d, p in zip(times, chosen, prompt_sequence(prompts, count, rng))]


@dataclass(frozen=True)
class ClosedLoopSession:
    """A device's next session in a closed loop: pause ``think_seconds`` after the previous one ends, then send."""

    think_seconds: float
    prompt: Prompt


def closed_loop_plan(
    fleet: FleetSpec,
    prompts: list[Prompt],
    sessions_per_device: int,
    seed: int = 0,
    think_seconds: float = 0.0,
    exponential_think: bool = True,
) -> dict[str, list[ClosedLoopSession]]:
    """Each device's sessions, by device id. Every device draws from its own stream, seeded by ``seed`` and its id,
    so a device's prompts do not change when the fleet around it does. The first session also waits a think time
    (devices do not all start at once) unless ``think_seconds`` is 0."""
    plan = {}
    for device in fleet.devices:
        rng = random.Random(f"wisp-bench/closed/{seed}/{device.device_id}")
        chosen = prompt_sequence(prompts, sessions_per_device, rng)
        pauses = think_times(think_seconds, sessions_per_device, rng, exponential_think)
        plan[device.device_id] = [ClosedLoopSession(t, p) for t, p in zip(pauses, chosen)]
    return plan
