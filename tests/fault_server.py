"""The injected engine fault of tests/test_faults.py: a real engine whose N-th batch raises.

Run as a module (``python -m fault_server ARGS``, with tests/ on the path) it is `wisp-server` itself, with only
the engine wrapped: ``FAULT_AT`` is the batch that fails and ``FAULT_FATAL=1`` makes the failure
`EngineDead` instead of an ordinary error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from wisp_common.request import SamplingParams
from wisp_server import server
from wisp_server.engines.base import EngineDead, RoundRequest, RoundVerdict, VerificationEngine


class FailingEngine(VerificationEngine):
    """Delegates to ``engine``; its ``fail_at``-th batch (counted from 1) raises ``error`` instead."""

    def __init__(self, engine: VerificationEngine, fail_at: int, error: type[Exception]):
        self.engine = engine
        self.name, self.info = engine.name, engine.info
        self.pads_batches, self.verifies_any_prompt = engine.pads_batches, engine.verifies_any_prompt
        self.fail_at, self.error = fail_at, error
        self.batches = 0
        self.failed: list[str] = []  # the failed batch's session ids

    def add_session(
        self,
        session_id: str,
        context: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        features=False,
        known_features=0,
        feature_layers=(),
    ) -> None:
        self.engine.add_session(session_id, context, sampling, max_tokens, features, known_features, feature_layers)

    def remove_session(self, session_id: str) -> None:
        self.engine.remove_session(session_id)

    def uncached_tokens(self, session_id: str) -> int:
        return self.engine.uncached_tokens(session_id)

    def kv_cache_usage(self) -> float:
        return self.engine.kv_cache_usage()

    def verify(self, batch: Sequence[RoundRequest]) -> list[RoundVerdict]:
        self.batches += 1
        if self.batches == self.fail_at:
            self.failed = [r.session_id for r in batch]
            raise self.error(f"injected fault in batch {self.batches}")
        return self.engine.verify(batch)


if __name__ == "__main__":
    build = server.build_engine
    fail_at, fatal = int(os.environ["FAULT_AT"]), os.environ.get("FAULT_FATAL") == "1"
    server.build_engine = lambda config: FailingEngine(build(config), fail_at, EngineDead if fatal else RuntimeError)
    sys.exit(server.main(sys.argv[1:]))
