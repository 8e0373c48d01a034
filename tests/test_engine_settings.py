"""What the server derives from the device it runs on and from the installed vLLM, checked without either."""

from __future__ import annotations

import re

import pytest

from wisp_common.models import resolve_device
from wisp_server.engines.vllm_engine import SUPPORTED_VLLM, check_vllm_version, device_settings, installed_vllm_version


def test_a_cuda_device_gets_the_gpu_settings_and_a_cpu_the_cpu_ones():
    gpu = device_settings("cuda:1")
    assert (gpu.block_size, gpu.enforce_eager, gpu.patch_cpu_sampler, gpu.environment) == (16, False, False, {})
    cpu = device_settings("cpu", cpu_count=2)
    assert cpu.block_size % 32 == 0 and cpu.enforce_eager and cpu.patch_cpu_sampler
    assert cpu.environment == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert device_settings("cpu", threads=1, cpu_count=2).environment["VLLM_CPU_OMP_THREADS_BIND"] == "0-0"


@pytest.mark.slow
def test_the_vllm_engine_serves_with_fewer_threads_than_cores(tmp_path, smollm2_tokenizer):
    """`--threads 1` on a machine with more cores: torch and vLLM's workers agree on one thread (every batch
    failed with INTERNAL when only torch was told)."""
    import grpc
    from helpers import tiny_llama

    from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
    from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
    from wisp_server.launcher import ServerProcess

    tiny_llama(len(smollm2_tokenizer), hidden=128, heads=4).save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    args = ["--target-model", str(tmp_path), "--engine", "vllm", "--threads", "1", "--kv-cache-gib", "0.05"]
    args += ["--no-profile-estimator"]
    with ServerProcess(args, log_prefix=None) as server:
        stub = pb_grpc.WispStub(grpc.insecure_channel(server.address))
        request = pb.GenerateRequest(
            prompt_token_ids=[1, 2, 3, 4], stop=pb.StopCondition(max_new_tokens=4, ignore_eos=True)
        )
        assert sum(len(r.token_ids) for r in stub.Generate(request, timeout=120)) == 4


def test_auto_is_cuda_only_where_there_is_one(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize("version", [f"{SUPPORTED_VLLM}.0", f"{SUPPORTED_VLLM}.2+cu128", f"{SUPPORTED_VLLM}.0+cpu"])
def test_the_supported_vllm_release_is_accepted(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.33.0", "0.31.1", "1.32.0"])
def test_another_vllm_release_is_refused_with_the_supported_one_named(version):
    with pytest.raises(RuntimeError, match=rf"vLLM {version} is installed.*vllm=={SUPPORTED_VLLM}\.\*"):
        check_vllm_version(version)


def test_the_installed_vllm_is_the_supported_release():
    check_vllm_version(installed_vllm_version())


def _engine_args(**options) -> dict:
    from wisp_common.config import ServerConfig
    from wisp_server.engines.vllm_engine import engine_args

    return engine_args(ServerConfig(**options), "/models/target", "bfloat16", device_settings("cuda"))


def test_gpu_settings_reach_vllms_engine_args():
    args = _engine_args(
        gpu_memory_utilization=0.85,
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        vllm_engine_args='{"distributed_executor_backend": "ray", "quantization": "fp8", "block_size": 32}',
    )
    assert (args["gpu_memory_utilization"], args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (
        0.85,
        4,
        2,
    )
    assert args["kv_cache_memory_bytes"] is None  # the KV cache is sized from the GPU's memory instead
    assert (args["distributed_executor_backend"], args["quantization"], args["block_size"]) == ("ray", "fp8", 32)
    assert args["speculative_config"]["model"].endswith(".NullProposer") and args["model"] == "/models/target"


def test_without_gpu_settings_the_kv_cache_is_the_configured_size():
    from vllm import EngineArgs

    args = _engine_args(kv_cache_gib=3)
    assert args["kv_cache_memory_bytes"] == 3 * 2**30 and "gpu_memory_utilization" not in args
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"], args["block_size"]) == (1, 1, 16)
    EngineArgs(**args)  # every keyword is one vLLM knows


def test_prefix_caching_is_on_unless_turned_off():
    assert _engine_args()["enable_prefix_caching"] is True
    assert _engine_args(prefix_caching=False)["enable_prefix_caching"] is False


@pytest.mark.parametrize(
    ("extra", "words"),
    [('["not", "a", "dict"]', "must be a JSON object"), ('{"max_model_len": 99}', "may not set ['max_model_len']")],
)
def test_vllm_engine_args_that_would_break_wisp_are_refused(extra, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        _engine_args(vllm_engine_args=extra)
