# An edge daemon (wisp-edge serve: the OpenAI-compatible API) on a plain x86-64 or arm64 host, CPU torch.
#   docker build -f deploy/docker/edge.Dockerfile -t wisp-edge .
#   docker run -p 8080:8080 wisp-edge serve --host 0.0.0.0 --server wisp.example:50051
# For a Jetson use edge-jetson.Dockerfile (CUDA torch from NVIDIA's l4t-pytorch image).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY wisp_common wisp_common
COPY wisp_edge wisp_edge
RUN pip install --no-cache-dir ".[edge]"

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=5m --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
ENTRYPOINT ["wisp-edge"]
CMD ["serve", "--host", "0.0.0.0"]
