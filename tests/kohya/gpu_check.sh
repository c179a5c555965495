#!/usr/bin/env bash
# The 2-process check of tests/kohya/test_multiprocess.py on GPUs: both ranks hold identical PaRa bases after
# sd-scripts' gradient all-reduce, and 2 processes x batch 1 match 1 process x batch 2 to fp32 rounding (TF32 off).
# With >= 2 GPUs: NCCL, one GPU per process; with 1 GPU: both processes on cuda:0 over gloo (NCCL cannot put two
# ranks on one GPU). Needs an NVIDIA GPU, a Python with CUDA torch and sd-scripts' requirements ($PYTHON,
# default python3), and sd-scripts' source (KOHYA_PATH, else the archive ../shared/kohya/ unpacked here).
#   tests/kohya/gpu_check.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$(dirname "$here")")"
py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/para_kohya_gpu.XXXXXX")"
trap 'rm -rf "$work"' EXIT
n=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [[ "${n:-0}" -lt 1 ]]; then
  echo "gpu_check: needs an NVIDIA GPU, found none; the CPU check is tests/kohya/test_multiprocess.py" >&2
  exit 2
elif [[ "$n" -eq 1 ]]; then  # NCCL refuses two ranks on one GPU; gloo all-reduces / broadcasts CUDA tensors
  export PARA_KOHYA_DDP_BACKEND=gloo
  echo "gpu_check: 1 GPU: both ranks on cuda:0, process group gloo"
else
  unset PARA_KOHYA_DDP_BACKEND  # accelerate's default on GPUs: NCCL, one GPU per rank
  echo "gpu_check: $n GPUs: one per rank, process group nccl"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
kohya="${KOHYA_PATH:-}"
if [[ -z "$kohya" ]]; then
  tgz="$repo/../shared/kohya/sd-scripts-48d368fa.tar.gz"
  echo "de6924dbf54a7bfc6df854f082edf220dad4cf17d3cb8627f68bcd654a2a4c5e  $tgz" | sha256sum -c --quiet -
  tar -xzf "$tgz" -C "$work"
  kohya="$work/sd-scripts"
fi
"$py" -c "import torch, accelerate, diffusers, transformers, pytest; assert torch.cuda.is_available()" || {
  echo "gpu_check: $py needs CUDA torch, accelerate, diffusers, transformers and pytest (sd-scripts' requirements)" >&2; exit 2; }
cd "$repo"
KOHYA_PATH="$kohya" PARA_KOHYA_DEVICE=cuda COMFYUI_PARA_REQUIRE_KOHYA=1 \
  "$py" -m pytest tests/kohya/test_multiprocess.py -q -s -ra -p no:cacheprovider
