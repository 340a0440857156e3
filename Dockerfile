# plmrun on CUDA machines (x86-64 and ARM64/GH200), built from this checkout only:
#   docker build -t plmrun .
#   docker run --gpus all --ipc=host -v $PWD/runs:/work/runs plmrun \
#       torchrun --standalone --nproc_per_node=gpu -m plmrun.cli train --config speedrun_133m
# Not built in CI (no image registry or GPU there); see docs/reference/distributed.md.
#
# The base image brings CUDA, cuDNN, NCCL and Python but not torch: torch comes from the PyTorch wheel
# index for the matching CUDA, whose aarch64 wheels bundle a Triton that works on GH200. Never mix two
# torch/triton builds in one image (torch on top of NGC's own build fails in torch.compile on ARM64 with
# a Triton/ptxas mismatch).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev git ca-certificates mmseqs2 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV \
    && pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX}

WORKDIR /opt/plmrun
# Dependencies first (cached layer), then the source.
COPY pyproject.toml README.md ./
COPY plmrun ./plmrun
RUN pip install ".[hf,probe,track,finetune]" \
    && python -c "import torch, peft, plmrun; print('plmrun', plmrun.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"

# Secrets (WANDB_API_KEY, HF_TOKEN) are passed at run time with -e, never baked into the image.
WORKDIR /work
CMD ["plmrun", "--help"]
