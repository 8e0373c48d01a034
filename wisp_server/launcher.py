"""`ServerProcess`: runs `wisp-server` as a child process, for the demo, benchmarks and tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

READY = re.compile(r"WISP server listening on (\S+):(\d+) \((?:metrics on :(\d+)/metrics, )?")


class ServerProcess:
    """Starts the server on a free port and waits until it is ready.

    The server's own log lines are echoed with ``log_prefix`` (or swallowed
    if it is None) so a failure to start shows why.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        log_prefix: str | None = "[server] ",
        startup_timeout: float = 600,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        module: str = "wisp_server.server",
    ):
        """``env`` adds environment variables; ``cpus`` pins the server to those cores; ``module`` runs another
        entry point with the same command line (tests: one that injects faults into the engine)."""
        command = [sys.executable, "-u", "-m", module, "--port", "0", "--metrics-port", "0", *args]
        environment = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        if cpus:
            os.sched_setaffinity(self.process.pid, cpus)
        self.log: list[str] = []
        self.metrics_port: int | None = None
        self.address = self._wait_ready(startup_timeout, log_prefix)
        threading.Thread(target=self._pump, args=(log_prefix,), daemon=True).start()

    def _wait_ready(self, timeout: float, log_prefix: str | None) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._record(line, log_prefix)
            match = READY.search(line)
            if match:
                self.metrics_port = int(match.group(3)) if match.group(3) else None
                return f"{match.group(1)}:{match.group(2)}"
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("wisp-server did not start:\n" + "".join(self.log[-30:]))

    def _pump(self, log_prefix: str | None) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._record(line, log_prefix)

    def _record(self, line: str, log_prefix: str | None) -> None:
        self.log.append(line)
        if log_prefix is not None:
            print(log_prefix + line, end="", flush=True)

    def stop(self, timeout: float = 30) -> int:
        """Ctrl-C, as an operator would; killed if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
