"""What the server derives from the device it runs on and from the installed vLLM, checked without either."""

from __future__ import annotations

import pytest

from wisp_common.models import resolve_device
from wisp_server.engines.vllm_engine import SUPPORTED_VLLM, check_vllm_version, device_settings, installed_vllm_version


def test_a_cuda_device_gets_the_gpu_settings_and_a_cpu_the_cpu_ones():
    gpu = device_settings("cuda:1")
    assert (gpu.block_size, gpu.enforce_eager, gpu.patch_cpu_sampler, gpu.environment) == (16, False, False, {})
    cpu = device_settings("cpu", cpu_count=2)
    assert cpu.block_size % 32 == 0 and cpu.enforce_eager and cpu.patch_cpu_sampler
    assert cpu.environment == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


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
