"""The emulated network between a device and the server, and a clock helper accurate to about a millisecond.

An emulated device talks to the real server over gRPC on loopback and sleeps the emulated network's delays around
its calls: before a request goes out it waits the uplink delay, and a response counts as received only once the
downlink delay after its real arrival has passed. The real loopback time (typically tens to hundreds of
microseconds, more on a loaded machine) is counted on top, so every emulated delay is slightly longer than its
profile says; at a 0.5 ms LAN round trip that is a noticeable share, at Wi-Fi's several milliseconds it is not.

Delay model (one message, one direction)::

    one_way_delay(n) = RTT_sample / 2 + n / bandwidth_of_that_direction

``RTT_sample`` is drawn, per message, from a lognormal distribution whose mean is the profile's ``rtt_seconds``
and whose standard deviation is its ``jitter_seconds``: never negative, long-tailed like measured Wi-Fi latency,
and exactly the profile's RTT on average (jitter 0: always the RTT). The two directions draw independently.
`Link.deliver_at` adds what a TCP connection does: a message is serialized after the previous one in the same
direction has left, and is never delivered before one sent earlier (HTTP/2 streams share one in-order connection).

Everything random comes from the `random.Random` given to the `Link`, so a seed fixes every delay.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

from wisp_bench.profiles import DeviceProfile

HTTP2_FRAME_HEADER_BYTES = 9  # RFC 9113 section 4.1: every HTTP/2 frame (a DATA frame here) starts with 9 bytes
GRPC_MESSAGE_PREFIX_BYTES = 5  # gRPC over HTTP/2 (PROTOCOL-HTTP2.md): compressed flag (1) + message length (4)
MESSAGE_OVERHEAD_BYTES = HTTP2_FRAME_HEADER_BYTES + GRPC_MESSAGE_PREFIX_BYTES
UPLINK, DOWNLINK = "uplink", "downlink"


def message_bytes(message) -> int:
    """Bytes a protobuf message puts on the wire in a gRPC stream: its serialized size plus one HTTP/2 DATA frame
    header and the gRPC length prefix. TCP/IP headers, TLS and HPACK'd HTTP/2 HEADERS frames (once per call, not
    per message on a stream) are left out."""
    return len(message.SerializeToString()) + MESSAGE_OVERHEAD_BYTES


def lognormal_parameters(mean: float, std: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal distribution with this mean and standard deviation."""
    if mean <= 0 or std < 0:
        raise ValueError(f"a lognormal needs mean > 0 and std >= 0, got {mean}, {std}")
    sigma2 = math.log1p((std / mean) ** 2)
    return math.log(mean) - sigma2 / 2, math.sqrt(sigma2)


class Link:
    """One device's emulated network link to the server, built from its profile and a seeded `random.Random`."""

    def __init__(self, profile: DeviceProfile, rng: random.Random):
        self.profile = profile
        self.rng = rng
        self._mu, self._sigma = lognormal_parameters(profile.rtt_seconds, profile.jitter_seconds)
        self._bandwidth = {UPLINK: profile.uplink_bytes_per_second, DOWNLINK: profile.downlink_bytes_per_second}
        self._free_at = {UPLINK: -math.inf, DOWNLINK: -math.inf}  # when the direction finishes sending
        self._last_delivery = {UPLINK: -math.inf, DOWNLINK: -math.inf}

    @classmethod
    def for_device(cls, profile: DeviceProfile, seed: int, device_id: str) -> Link:
        """A link whose delays depend only on ``seed`` and the device's id (not on the other devices)."""
        return cls(profile, random.Random(f"wisp-bench/link/{seed}/{device_id}"))

    def rtt_sample(self) -> float:
        """One round trip time without transmission time: lognormal, mean ``rtt_seconds``, std ``jitter_seconds``."""
        if self._sigma == 0:
            return self.profile.rtt_seconds
        return self.rng.lognormvariate(self._mu, self._sigma)

    def transmission_seconds(self, nbytes: int, direction: str = UPLINK) -> float:
        if nbytes < 0:
            raise ValueError(f"a message has >= 0 bytes, got {nbytes}")
        return nbytes / self._bandwidth[_checked(direction)]

    def one_way_delay(self, nbytes: int, direction: str = UPLINK) -> float:
        """Half a sampled RTT plus ``nbytes`` at the direction's bandwidth: never negative."""
        return self.rtt_sample() / 2 + self.transmission_seconds(nbytes, direction)

    def uplink_delay(self, nbytes: int) -> float:
        """Device -> server."""
        return self.one_way_delay(nbytes, UPLINK)

    def downlink_delay(self, nbytes: int) -> float:
        """Server -> device."""
        return self.one_way_delay(nbytes, DOWNLINK)

    def deliver_at(self, sent_at: float, nbytes: int, direction: str = UPLINK) -> float:
        """When a message handed to the link at ``sent_at`` arrives: its transmission starts once the previous
        message in this direction has left, then half an RTT sample; and it never overtakes an earlier one."""
        direction = _checked(direction)
        start = max(sent_at, self._free_at[direction])
        self._free_at[direction] = start + self.transmission_seconds(nbytes, direction)
        arrival = max(self._free_at[direction] + self.rtt_sample() / 2, self._last_delivery[direction])
        self._last_delivery[direction] = arrival
        return arrival


def _checked(direction: str) -> str:
    if direction not in (UPLINK, DOWNLINK):
        raise ValueError(f"direction must be {UPLINK!r} or {DOWNLINK!r}, got {direction!r}")
    return direction


def sleep_until(deadline: float, spin_seconds: float = 0.001, clock: Callable[[], float] = time.monotonic) -> float:
    """Sleeps until ``clock()`` reaches ``deadline`` (a `time.monotonic` time by default); returns how late it woke
    (>= 0). Sleeps all but the last ``spin_seconds`` (the OS may oversleep by a scheduler tick), then yields in a
    short loop until the deadline. A deadline in the past returns at once."""
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return -remaining
        if remaining > spin_seconds:
            time.sleep(remaining - spin_seconds)
        else:
            time.sleep(0)  # yield (the GIL too) without giving the scheduler a chance to oversleep much
