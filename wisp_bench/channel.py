"""A gRPC channel to the real server (on loopback) that delays every message as the device's network would.

The device's requests leave when its own code sends them and reach the server one emulated one-way delay
later (round trip over two, jitter, the message's bytes over the uplink); the server's answers reach the
device one downlink delay after the server sent them. Messages keep their order, as on one TCP connection.
The real loopback's own sub-millisecond time comes on top.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import grpc

Delay = Callable[[int], float]  # seconds for a message of that many bytes to cross the link one way


class _Delayed:
    """The messages of ``source`` as the far end sees them: each one delay after it was sent, in order.

    A thread stamps every message the moment its sender hands it over, so a message sent while an earlier
    one is still on the wire keeps its own send time. The end of the stream, or its error, comes in turn.
    """

    _END = object()

    def __init__(self, source, delay: Delay):
        self._inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(source, delay), daemon=True).start()

    def _pump(self, source, delay: Delay) -> None:
        ready = 0.0
        try:
            for message in source:
                ready = max(ready, time.monotonic() + delay(message.ByteSize()))  # never overtakes the one before
                self._inbox.put((ready, message))
            self._inbox.put((ready, self._END))
        except Exception as error:  # the call's error reaches the far end after what was sent before it
            self._inbox.put((ready, error))

    def __iter__(self):
        return self

    def __next__(self):
        ready, item = self._inbox.get()
        while (left := ready - time.monotonic()) > 0:
            time.sleep(left)
        if item is self._END:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item


class _EmulatedLink(grpc.StreamStreamClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, uplink: Delay, downlink: Delay):
        self.uplink, self.downlink = uplink, downlink

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return _Responses(continuation(client_call_details, _Delayed(request_iterator, self.uplink)), self.downlink)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        time.sleep(self.uplink(request.ByteSize()))
        return _Responses(continuation(client_call_details, request), self.downlink)


class _Responses(_Delayed):
    """The server's stream as the device receives it; cancelling it still cancels the call."""

    def __init__(self, call, delay: Delay):
        super().__init__(call, delay)
        self._call = call

    def cancel(self) -> bool:
        return self._call.cancel()


def emulated_channel(address: str, uplink: Delay, downlink: Delay) -> grpc.Channel:
    """An insecure channel to ``address`` whose streaming calls cross the emulated link."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _EmulatedLink(uplink, downlink))
