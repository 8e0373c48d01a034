"""The edge survives losing its server: real server processes, killed, stopped and restarted mid-generation.

The edge resumes its session on a new stream with the tokens committed so far (OpenSession.committed_token_ids),
on the same server once it is back or on another one, and its output is exactly an uninterrupted run's: greedy
token for token, and sampled in the target's distribution.
"""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
import torch
from faults import PROMPT, Paced, edge_client, free_port, metrics, tiny_server, wait_until
from helpers import reference_greedy, running_server, save_with_tokenizer, tiny_llama
from scipy.stats import chisquare

from wisp_common.config import EdgeConfig
from wisp_common.models import load_causal_lm, tokenizer_fingerprint
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import SamplingParams
from wisp_common.verification import target_distribution
from wisp_edge.cli import build_client
from wisp_edge.client import ResumePolicy
from wisp_server.launcher import ServerProcess

NEW_TOKENS = 160


@pytest.fixture(scope="module")
def uninterrupted(tiny_pair) -> list[int]:
    """What the edge gets when nothing breaks: the target's own greedy tokens (test_grpc_service shows it)."""
    return reference_greedy(load_causal_lm(tiny_pair[0]), PROMPT, NEW_TOKENS)


@pytest.mark.slow  # a server process or two, started and killed: about a minute here
@pytest.mark.parametrize("server_paced", [False, True], ids=["edge-paced", "server-paced"])
def test_a_server_killed_and_restarted_on_its_port_loses_nothing(
    tiny_pair, smollm2_tokenizer, uninterrupted, server_paced
):
    port = free_port()
    client = edge_client(f"127.0.0.1:{port}", tiny_pair[1], smollm2_tokenizer)
    client.pacing = "server" if server_paced else "edge"  # server-paced, it decodes ahead of the edge: break sooner
    with tiny_server(tiny_pair[0], port) as first:
        run = Paced(client, after=10 if server_paced else 40, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        run.wait_reached()
        first.process.kill()  # kill -9, most likely mid-round
        first.process.wait()
    with tiny_server(tiny_pair[0], port) as second:
        result = run.join()
        assert result.token_ids == uninterrupted
        assert result.stats.resumes >= 1
        wait_until(lambda: metrics(second)["wisp_sessions_active"] == 0, timeout=5)


@pytest.mark.slow  # a server process or two, started and killed: about a minute here
def test_a_session_fails_over_to_a_second_server(tiny_pair, smollm2_tokenizer, uninterrupted):
    with tiny_server(tiny_pair[0]) as a, tiny_server(tiny_pair[0]) as b:
        client = edge_client(f"{a.address},{b.address}", tiny_pair[1], smollm2_tokenizer)
        run = Paced(client, after=40, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        run.wait_reached()
        serving, other = (a, b) if metrics(a)["wisp_sessions_active"] == 1 else (b, a)
        serving.process.kill()
        result = run.join()
        assert result.token_ids == uninterrupted and result.stats.resumes >= 1
        assert metrics(other)["wisp_sessions_total"] >= 1  # it finished there


@pytest.mark.slow  # a server process or two, started and killed: about a minute here
def test_a_hung_server_misses_the_deadline_and_the_session_moves_on(tiny_pair, smollm2_tokenizer, uninterrupted):
    """SIGSTOP: the connection stays up but nothing answers. The edge's deadline fires and it resumes on the other
    server; the stopped one, continued, frees the abandoned session and serves on."""
    with tiny_server(tiny_pair[0]) as a, tiny_server(tiny_pair[0]) as b:
        hurried = ResumePolicy(round_timeout=1.5, max_retries=20, backoff=0.1, backoff_max=0.5)
        client = edge_client(f"{a.address},{b.address}", tiny_pair[1], smollm2_tokenizer, hurried)
        run = Paced(client, after=40, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        run.wait_reached()
        hung = a if metrics(a)["wisp_sessions_active"] == 1 else b
        hung.process.send_signal(signal.SIGSTOP)
        try:
            result = run.join(timeout=60)
        finally:
            hung.process.send_signal(signal.SIGCONT)
        assert result.token_ids == uninterrupted and result.stats.resumes >= 1
        wait_until(lambda: metrics(hung)["wisp_sessions_active"] == 0, timeout=10)
        assert client.generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids == uninterrupted[:8]


@pytest.mark.slow  # a server process or two, started and killed: about a minute here
def test_a_sampled_session_resumed_after_a_kill_streams_each_token_once(tiny_pair, smollm2_tokenizer):
    port = free_port()
    client = edge_client(f"127.0.0.1:{port}", tiny_pair[1], smollm2_tokenizer)
    sampling = SamplingParams(temperature=1.0, seed=7)
    with tiny_server(tiny_pair[0], port) as first:
        run = Paced(client, after=40, max_new_tokens=NEW_TOKENS, ignore_eos=True, sampling=sampling)
        run.wait_reached()
        first.process.kill()
        first.process.wait()
    with tiny_server(tiny_pair[0], port):
        result = run.join()  # checks that the streamed tokens are the result's: none twice, none skipped
    assert len(result.token_ids) == NEW_TOKENS and result.stats.resumes >= 1


@pytest.mark.slow  # 2400 streams: about half a minute here
def test_sampled_sessions_resumed_mid_way_keep_the_target_distribution(tmp_path, smollm2_tokenizer):
    """Each of many seeded sessions takes one token on a first stream, which then breaks; the session is resumed
    on a new stream with that token committed and the same seed, and verifies a draft there. The token after the
    resume must follow the target's distribution given the first, averaged over the first: a resumed session
    that reused the first stream's random numbers would not."""
    vocab, sessions = 16, 1200
    target = tiny_llama(vocab, layers=1, seed=3, hidden=64, heads=2)
    path = save_with_tokenizer(target, smollm2_tokenizer, tmp_path / "target")
    prompt = [1, 2, 3]
    sampling = SamplingParams(temperature=1.0)
    with torch.inference_mode():
        p1 = target_distribution(target(torch.tensor([prompt])).logits[0, -1], sampling)
        after = [
            target_distribution(target(torch.tensor([prompt + [t]])).logits[0, -1], sampling) for t in range(vocab)
        ]
    p2 = sum(p1[t] * after[t] for t in range(vocab))
    likely = [int(a.argmax()) for a in after]  # the draft after each first token: its likeliest, often accepted

    identity = pb.ModelIdentity(name="draft", tokenizer_fingerprint=tokenizer_fingerprint(smollm2_tokenizer))
    second: list[int] = []
    lock = threading.Lock()

    def session(stub: pb_grpc.WispStub, seed: int) -> None:
        opening = pb.OpenSession(
            draft_model=identity,
            prompt_token_ids=prompt,
            sampling=pb.SamplingParams(temperature=1.0, seed=seed),
            stop=pb.StopCondition(max_new_tokens=3, ignore_eos=True),
        )
        first = list(stub.Speculate(iter([pb.SpeculateRequest(open=opening), round_(len(prompt), [])]), timeout=30))
        token = first[1].verdict.next_token  # the stream breaks here (the edge goes away); the server forgets it
        opening.committed_token_ids.append(token)
        resumed = list(
            stub.Speculate(iter([pb.SpeculateRequest(open=opening), round_(4, [likely[token]])]), timeout=30)
        )
        verdict = resumed[1].verdict
        with lock:
            second.append(likely[token] if verdict.num_accepted else verdict.next_token)

    def round_(position: int, drafts: list[int]) -> pb.SpeculateRequest:
        return pb.SpeculateRequest(draft=pb.DraftRound(position=position, token_ids=drafts))

    with running_server(path, engine="hf", max_sessions=8, profile_estimator=False) as server:
        stub = pb_grpc.WispStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))

        def worker(offset: int) -> None:
            for seed in range(1 + offset, sessions + 1, 4):
                session(stub, seed)

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    counts = torch.bincount(torch.tensor(second), minlength=vocab).float()
    expected = p2 * sessions
    rare = expected < 5  # chi-square wants at least 5 expected per cell: the rare tokens share one
    if rare.any():
        counts = torch.cat([counts[~rare], counts[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    assert counts.sum() == sessions
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_default_models_resume_after_a_restart_token_for_token(engine, smollm2_tokenizer):
    """The default target and its feature-conditioned draft: the restarted server sends the features of the
    whole context again with the resumed session's first verdict, and the edge's output is unchanged."""
    args = ["--target-model", "smollm2-135m-instruct", "--engine", engine, "--dtype", "float32"]
    args += ["--no-profile-estimator"]  # resuming is the subject; both starts are quicker without the profile
    port, new_tokens = free_port(), 96
    config = EdgeConfig(server=f"127.0.0.1:{port}", threads=1)
    with ServerProcess([*args, "--port", str(port)], log_prefix=None) as first:
        client, _ = build_client(config)  # the default draft, pipelined, adaptive, as `wisp-edge generate` runs it
        client.resume = ResumePolicy(round_timeout=20.0, max_retries=400, backoff=0.5, backoff_max=2.0)
        uninterrupted = client.generate(PROMPT, max_new_tokens=new_tokens, ignore_eos=True).token_ids
        run = Paced(client, after=30, max_new_tokens=new_tokens, ignore_eos=True)
        run.wait_reached()
        first.process.kill()
        first.process.wait()
    with ServerProcess([*args, "--port", str(port)], log_prefix=None):
        result = run.join(timeout=900)
    assert result.token_ids == uninterrupted and result.stats.resumes >= 1
