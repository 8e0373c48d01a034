"""`wisp-bench`: a fleet of emulated edge devices against a live WISP server, compared with centralized serving.

It stands apart from both wings, like the trainer: it drives a real server over gRPC with devices that replay
what the real draft would propose, with the timing of a device profile and an emulated network.
"""

from pathlib import Path

# The MT-Bench questions (FastChat, Apache-2.0: data/LICENSE-mt_bench.txt): every benchmark's default prompts.
MT_BENCH = Path(__file__).parent / "data" / "mt_bench_questions.jsonl"
# Tasks beyond chat (translation, summarization, passage QA, math, retrieval-augmented answers), with a `category`
# each, written for WISP (CC0: data/LICENSE-beyond_chat.txt).
BEYOND_CHAT = Path(__file__).parent / "data" / "beyond_chat.jsonl"
