# An edge daemon on an NVIDIA Jetson (JetPack 6, L4T r36): NVIDIA's CUDA build of torch from l4t-pytorch.
#   docker build -f deploy/docker/edge-jetson.Dockerfile -t wisp-edge-jetson .
#   docker run --runtime nvidia -p 8080:8080 wisp-edge-jetson serve --host 0.0.0.0 --server wisp.example:50051
# L4T_PYTORCH must match the board's L4T release (cat /etc/nv_tegra_release) and carry torch 2.4 or later.
ARG L4T_PYTORCH=dustynv/l4t-pytorch:r36.4.0
FROM ${L4T_PYTORCH}

ENV PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY wisp_common wisp_common
COPY wisp_edge wisp_edge
# Pin the image's torch so pip never swaps NVIDIA's Jetson build for a PyPI one.
RUN pip freeze | grep -i '^torch==' > /tmp/torch.txt \
    && pip install --no-cache-dir --constraint /tmp/torch.txt ".[edge]"

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=5m --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
ENTRYPOINT ["wisp-edge"]
CMD ["serve", "--host", "0.0.0.0", "--device", "cuda"]
