#!/usr/bin/env bash
# GPU check (under 10 minutes on one GPU): full-size SD1.5 and SDXL UNets with random weights;
# 1. (issue 9) patch time vs LoraLoader, train s/step and peak memory vs core Train LoRA and vs the floor (SDXL at
#    1024 px, bf16). Writes gpu_check.json (or $OUT/gpu_check.json) and prints a table.
# 2. (issue 13) dynamic VRAM: the PaRa-patched SDXL UNet sampled with ComfyUI allowed 3 GiB of VRAM (streamed,
#    patched per layer through LowVramPatch / prefetch_prepared_value) against the same model fully loaded
#    (benchmarks/gpu_dynamic_vram.py; needs a ComfyUI with dynamic VRAM, so it uses the newest archive found).
#    Writes gpu_dynamic_vram.json.
# 3. (issue 14) Train PaRa on the full-size Flux.1 dev transformer (random weights, fp8 base, 1024 px, bf16,
#    checkpointing, ExCA rank 8) within 24 GB: torch.cuda.max_memory_allocated < 24 GiB, else it fails
#    (benchmarks/gpu_flux_24gb.py). Writes gpu_flux_24gb.json.
#
#   benchmarks/gpu_check.sh              # on a machine with an NVIDIA GPU
#   benchmarks/gpu_check.sh --cpu-smoke  # the same code on the CPU with tiny UNets (checks the script only)
#
# ComfyUI: $COMFYUI_PATH, else ~/ComfyUI, else the unmodified ComfyUI 0.8.0 archive in shared/comfyui/ (or
# ../shared/comfyui/) unpacked into a temporary folder. Python: $PYTHON, else python3; it must have torch (with
# CUDA unless --cpu-smoke). If ComfyUI's requirements are missing, a virtual environment on top of that Python
# (--system-site-packages) gets them from pip; where pip cannot reach an index the script stops and names them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
smoke=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then smoke=1; fi
out_dir="${OUT:-$repo}"
json="$out_dir/gpu_check.json"
py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/para_gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([[ $smoke == 1 ]] && echo 1 || nproc)}"

if [[ $smoke == 0 ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU (nvidia-smi missing or failing); use --cpu-smoke to check the script on a CPU" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# ---- ComfyUI ----
comfy="${COMFYUI_PATH:-}"
if [[ -z "$comfy" && -f "$HOME/ComfyUI/main.py" ]]; then comfy="$HOME/ComfyUI"; fi
if [[ -z "$comfy" ]]; then
  for tgz in "$repo/shared/comfyui/ComfyUI-0.8.0.tar.gz" "$repo/../shared/comfyui/ComfyUI-0.8.0.tar.gz"; do
    if [[ -f "$tgz" ]]; then
      tar -xzf "$tgz" -C "$work"
      comfy="$work/ComfyUI"
      break
    fi
  done
fi
if [[ -z "$comfy" || ! -f "$comfy/main.py" ]]; then
  echo "gpu_check: no ComfyUI found (set COMFYUI_PATH, or put ComfyUI-0.8.0.tar.gz in shared/comfyui/)" >&2
  exit 2
fi
echo "ComfyUI: $comfy"

# ---- Python ----
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check: $py has no torch; set PYTHON to an interpreter with torch" >&2
  exit 2
fi
if [[ $smoke == 0 ]] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch in $py does not see a CUDA device" >&2
  exit 2
fi
missing() {  # ComfyUI's imports that a model-only run needs
  "$1" - <<'PY'
import importlib.util
# what ComfyUI imports in-process (no server: the front-end packages and the optional kornia are not needed)
mods = ["torch", "torchvision", "safetensors", "einops", "torchsde", "transformers", "tokenizers", "sentencepiece",
        "scipy", "PIL", "yaml", "tqdm", "psutil", "aiohttp", "av", "requests", "alembic", "sqlalchemy", "numpy",
        "spandrel", "pydantic"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PY
}
need="$(missing "$py")"
if [[ -n "$need" ]]; then
  echo "gpu_check: $py lacks: $need - creating a virtual environment on top of it"
  "$py" -m venv --system-site-packages "$work/venv"
  if ! "$work/venv/bin/python" -m pip install -q -r "$comfy/requirements.txt"; then
    echo "gpu_check: pip could not install ComfyUI's requirements (offline?); still missing: $need" >&2
    exit 2
  fi
  py="$work/venv/bin/python"
fi
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

# ---- run (7.5 minutes at most on a GPU; the CPU smoke run is slower and gets an hour) ----
args=(--comfyui "$comfy" --out "$json")
limit="${GPU_CHECK_LIMIT:-450}"
if [[ $smoke == 1 ]]; then args+=(--cpu-smoke); limit=3600; fi
failed=()  # each part runs even when an earlier one fails; the script fails at the end
timeout --kill-after=10 "$limit" "$py" "$here/gpu_check.py" "${args[@]}" && echo "wrote $json" || failed+=(gpu_check.py)

# ---- Flux.1 dev in 24 GB (issue 14): fp8 base, 1024 px, checkpointing; fails when over the budget ----
fargs=(--comfyui "$comfy" --out "$out_dir/gpu_flux_24gb.json")
if [[ $smoke == 1 ]]; then fargs+=(--cpu-smoke); fi
timeout --kill-after=10 "$limit" "$py" "$here/gpu_flux_24gb.py" "${fargs[@]}" && echo "wrote $out_dir/gpu_flux_24gb.json" || failed+=(gpu_flux_24gb.py)

# ---- dynamic VRAM (ComfyUI 0.33 or later: $COMFYUI_DYNAMIC_PATH, else the 0.33.0 archive, else the ComfyUI above) ----
dyn="${COMFYUI_DYNAMIC_PATH:-}"
if [[ -z "$dyn" ]]; then
  for tgz in "$repo/shared/comfyui/ComfyUI-0.33.0.tar.gz" "$repo/../shared/comfyui/ComfyUI-0.33.0.tar.gz"; do
    if [[ -f "$tgz" ]]; then
      mkdir -p "$work/dyn" && tar -xzf "$tgz" -C "$work/dyn"
      dyn="$work/dyn/ComfyUI"
      break
    fi
  done
fi
dyn="${dyn:-$comfy}"
dargs=(--comfyui "$dyn" --out "$out_dir/gpu_dynamic_vram.json")
if [[ $smoke == 1 ]]; then dargs+=(--cpu-smoke); fi
timeout --kill-after=10 "$limit" "$py" "$here/gpu_dynamic_vram.py" "${dargs[@]}" && echo "wrote $out_dir/gpu_dynamic_vram.json" || failed+=(gpu_dynamic_vram.py)
if (( ${#failed[@]} )); then echo "gpu_check: failed: ${failed[*]}" >&2; exit 1; fi
