# The image `vlpt launch k8s` runs (k8s.image): this repository at /workspace/vlpt (k8s.workdir), `vlpt`
# installed into /opt/venv, run as the unprivileged user vlpt (uid 1000).
#   docker build -t <registry>/vlpt:<tag> .
#   docker push <registry>/vlpt:<tag>        # then k8s.image: <registry>/vlpt:<tag> in the cluster YAML
# The PyTorchJob's container runs `torchrun ... -m vlpt pretrain --config /etc/vlpt/config.yaml` (its
# `command` replaces the ENTRYPOINT); `docker run --gpus all <image> pretrain --config ...` runs one process.

# CUDA 12.8 "base": the driver hooks of the NVIDIA container toolkit and its check that the node's driver
# runs CUDA 12.8 (>= 570). The CUDA libraries themselves come with torch's cu128 wheels below.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

# gcc + Python headers: Triton (vlpt's kernels, torch.compile) compiles a small launcher per kernel at run
# time; g++ + ninja: DeepSpeed's CPU Adam (parallel.offload_optimizer) is built on first use. Python 3.12
# is Ubuntu 24.04's; the pins of requirements.txt install on it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# uid 1000 is the base's `ubuntu` user: it makes way for vlpt.
RUN python3 -m venv /opt/venv \
    && if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group vlpt

# torch first, deliberately: the version requirements.txt pins (2.13.0, what CI tests; setup.py's floor,
# torch>=2.11, is for hosts that bring their own torch, as the GPU machines' 2.11), built for CUDA 12.8
# (`cu128`, matching the base above) from PyTorch's own index: PyPI's torch wheel is built for whatever
# CUDA that release chose, which the base's driver check would not vouch for. For nodes with an older
# driver, change both: e.g. FROM nvidia/cuda:12.6.3-base-ubuntu24.04 and --build-arg TORCH_CUDA=cu126.
ARG TORCH_CUDA=cu128
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" torch==2.13.0

# The rest of requirements.txt (every line pinned with ==; torch==2.13.0 is already met by the build
# above), less the test-only packages.
WORKDIR /workspace/vlpt
COPY requirements.txt .
RUN grep -vE '^(pytest|pytest-timeout|moto|jsonschema)([=\[ ]|$)' requirements.txt > /tmp/runtime-requirements.txt \
    && pip install -r /tmp/runtime-requirements.txt \
    && rm /tmp/runtime-requirements.txt

# The repository (configs, the demo vocabulary: a run config's relative paths resolve against the
# working directory), and `vlpt` installed from it; its dependencies are the pins above.
COPY --chown=1000:1000 . .
RUN pip install --no-deps . \
    && install -d -o 1000 -g 1000 /workspace/vlpt/runs \
    && chown 1000:1000 /workspace/vlpt
USER 1000:1000
ENV HOME=/home/vlpt

ENTRYPOINT ["vlpt"]
CMD ["--help"]
