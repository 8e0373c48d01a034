"""Per-device rate limits as token buckets: one device cannot crowd out the others.

A bucket holds up to ``capacity`` tokens and refills at ``rate`` per second; each session or round takes one. A
device may burst up to the capacity, then settles at the rate. A refused caller is told how long until a token is
back, which the server hands to the edge as its retry hint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> float:
        """Takes a token if there is one and returns 0, else the seconds until there will be one."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.capacity


class DeviceRateLimit:
    """One bucket per device, made on first use.

    Full buckets are forgotten once more than ``max_idle_devices`` are held, since a full bucket is the same as a
    new one: without tokens a client can claim any device id, and that must not grow memory without bound.
    """

    def __init__(
        self,
        rate: float,
        capacity: float,
        max_idle_devices: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rate = rate
        self.capacity = capacity
        self.max_idle_devices = max_idle_devices
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, device: str) -> float:
        """0 where ``device`` may go ahead, else the seconds until it may."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(device)
            if bucket is None:
                if len(self._buckets) >= self.max_idle_devices:
                    self._buckets = {d: b for d, b in self._buckets.items() if not b.full(now)}
                bucket = self._buckets[device] = TokenBucket(self.rate, self.capacity, now)
            return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
