# The GPU image for KubeRay (k8s/rayjob.yaml): this checkout with its .venv built for CUDA machines
# (the gpu extra: official vLLM), Ray and every pinned package as scripts/setup.sh installs them.
#   docker build -t <registry>/clinicalgpt:gpu .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts scripts
COPY clinicalgpt clinicalgpt
COPY actors actors
COPY jobs jobs
COPY bench bench
RUN PYTHON=python3.11 CLINICALGPT_EXTRAS=gpu,dev bash scripts/setup.sh
# KubeRay runs `ray start` and the entrypoint with the image's PATH.
ENV PATH=/app/.venv/bin:$PATH DS_ACCELERATOR=cuda HF_HUB_OFFLINE=0
