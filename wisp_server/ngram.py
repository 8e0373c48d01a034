"""`NgramSpeculation`: vLLM's own n-gram speculation (prompt lookup) for the target served alone.

It is the baseline a vLLM user would turn on instead of edge drafting: no draft model, the server proposes the
tokens that followed the longest earlier match of the context's last few tokens. `--generate-speculation` takes
the JSON vLLM's ``--speculative-config`` takes for it, with vLLM's defaults, and proposes what vLLM's
`NgramProposer` proposes (a test checks it against vLLM's own function; importing that here would load numba,
which breaks a vLLM engine started later in the same process). The server verifies the proposals like any
draft, in whichever engine it runs, so the baseline runs in the modeled regime too. It applies to the `Generate`
RPC only; edge sessions bring their own drafts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

# vLLM's documented example: https://docs.vllm.ai/en/latest/features/spec_decode.html (n-gram)
VLLM_NGRAM_EXAMPLE = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}'
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}


@dataclass(frozen=True)
class NgramSpeculation:
    num_speculative_tokens: int
    prompt_lookup_min: int
    prompt_lookup_max: int

    @classmethod
    def parse(cls, text: str) -> NgramSpeculation | None:
        """The option's JSON, read as vLLM reads its speculative config for method "ngram"; None when empty."""
        if not text:
            return None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--generate-speculation is not JSON ({error}); e.g. {VLLM_NGRAM_EXAMPLE}") from None
        if not isinstance(spec, dict) or spec.get("method") != "ngram":
            raise ValueError(f'--generate-speculation supports method "ngram" only; e.g. {VLLM_NGRAM_EXAMPLE}')
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise ValueError(f"--generate-speculation: unknown keys {unknown}; known: {sorted(_KEYS)}")
        tokens = spec.get("num_speculative_tokens")
        low, high = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
        if low is None and high is None:
            low = high = 5  # vLLM's default when neither is given
        low, high = low if low is not None else high, high if high is not None else low
        if not all(isinstance(v, int) and v >= 1 for v in (tokens, low, high)) or low > high:
            raise ValueError(
                "--generate-speculation needs num_speculative_tokens >= 1 and 1 <= prompt_lookup_min <= "
                f"prompt_lookup_max, got {spec}"
            )
        return cls(tokens, low, high)

    def propose(self, context: Sequence[int], room: int) -> list[int]:
        """The drafts for the next step of a session with ``context`` that may commit ``room`` more tokens.

        The tokens after the earliest earlier occurrence of the longest suffix of ``prompt_lookup_min`` to
        ``prompt_lookup_max`` tokens; none beyond what the session could commit (vLLM: its max_model_len).
        """
        k = min(self.num_speculative_tokens, room - 1)
        tokens = list(context)
        if k <= 0:
            return []
        for n in range(min(self.prompt_lookup_max, len(tokens) - 1), self.prompt_lookup_min - 1, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n):
                if tokens[start : start + n] == suffix:
                    return tokens[start + n : start + n + k]
        return []
