#!/usr/bin/env bash
# The llama.cpp VLM peer for bench/run.py (engines llama.cpp and llama.cpp-q8_0): GGUF conversions of the
# random-weight real-size checkpoint, made with the converter of llama-cpp-python 0.3.36's own source tree
# (the same llama.cpp revision as the bench/.cache/llama-venv build, so the GGUFs match the runtime).
# Bench-only, never a project dependency; everything lands in the gitignored bench/.cache. Idempotent:
# each step is skipped when its output exists (FORCE=1 redoes the conversions).
#
#     bash bench/setup_llamacpp_vlm.sh            # 256M
#     bash bench/setup_llamacpp_vlm.sh 500M       # needs bench/.cache/500M/ckpt
#
# Output, bench/.cache/<MODEL>/llamacpp/:
#   text-bf16.gguf, text-f32.gguf, text-q8_0.gguf   the text model (--outtype bf16 / f32 / q8_0)
#   mmproj-bf16.gguf, mmproj-f32.gguf               vision encoder + connector (--mmproj)
#
# Workarounds (shared/PEERS.md, "llama.cpp" and "OpenVINO"):
# - the converter needs transformers 4.57 (AutoConfig/AutoTokenizer) and torch; the project venv has
#   transformers 5.x, so it runs with bench/.cache/openvino-venv's python (transformers 4.57.6, torch
#   2.13.0 CPU; made by bench/setup_openvino.sh), or, without that venv, a small converter venv
#   (bench/.cache/llama-convert-venv) with the same pins;
# - the converter imports sentencepiece unconditionally for a llama-arch text model (before looking for a
#   tokenizer.model; it then falls back to tokenizer.json's BPE): `ModuleNotFoundError: No module named
#   'sentencepiece'` without it; installed with `pip install --target bench/.cache/llama-convert-extra`;
# - the converter imports `gguf` and its newest APIs: use the source tree's own gguf-py (PYTHONPATH),
#   never a PyPI gguf, whose version can lag the converter;
# - transformers 4.57 does not read `rope_parameters` from a config.json written by transformers 5.x
#   (bench/.cache/<model>/ckpt), so convert from bench/peer_source.sh's folder (the checkpoint's
#   weights + the reference config.json with a top-level rope_theta, dims checked), the one the
#   OpenVINO export reads;
# - `pip download --no-binary :all:` of the sdist prepares its metadata with scikit-build-core in an
#   isolated build env (no compile; a few seconds).
set -euo pipefail

MODEL=${1:-256M}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$ROOT/bench/.cache
VERSION=0.3.36                       # = the llama-cpp-python in bench/.cache/llama-venv
LLAMA_VENV=$CACHE/llama-venv
SRC_DIR=$CACHE/llama-src
LLAMA_CPP=$SRC_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
OUT=$CACHE/$MODEL/llamacpp
TORCH=torch==2.13.0
TRANSFORMERS=transformers==4.57.6

# 1. the runtime venv (llama-cpp-python built without AMX)
if ! "$LLAMA_VENV/bin/python" -c "import llama_cpp, llama_cpp.mtmd_cpp" 2>/dev/null; then
  echo "llama venv: building it with bench/setup_llamacpp.sh (about 16 minutes on 2 cores)"
  bash "$ROOT/bench/setup_llamacpp.sh"
fi
have=$("$LLAMA_VENV/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)")
[ "$have" = "$VERSION" ] || echo "warning: $LLAMA_VENV has llama-cpp-python $have, the converter is from $VERSION" >&2

# 2. llama-cpp-python's source tree (vendor/llama.cpp: convert_hf_to_gguf.py, conversion/, gguf-py/)
if [ -f "$LLAMA_CPP/convert_hf_to_gguf.py" ]; then
  echo "source: $LLAMA_CPP exists"
else
  echo "source: downloading llama-cpp-python==$VERSION (sdist, ~75 MB)"
  mkdir -p "$SRC_DIR"
  "$LLAMA_VENV/bin/pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC_DIR"
  tar xzf "$SRC_DIR/llama_cpp_python-$VERSION.tar.gz" -C "$SRC_DIR"
fi

# 3. the converter's python: transformers 4.57 + torch (the OpenVINO venv has both)
CONVERT_PY=${LLAMACPP_CONVERT_PY:-}
if [ -z "$CONVERT_PY" ]; then
  for py in "$CACHE/openvino-venv/bin/python" "$CACHE/llama-convert-venv/bin/python"; do
    if "$py" -c "import torch, transformers, yaml, tqdm, requests; assert transformers.__version__.startswith('4.57')" 2>/dev/null; then
      CONVERT_PY=$py; break
    fi
  done
fi
if [ -z "$CONVERT_PY" ]; then
  echo "converter venv: creating $CACHE/llama-convert-venv ($TORCH, $TRANSFORMERS)"
  python3 -m venv "$CACHE/llama-convert-venv"
  CONVERT_PY=$CACHE/llama-convert-venv/bin/python
  "$CONVERT_PY" -m pip install --quiet "$TORCH"                 # the local CPU wheel first, then keep it pinned
  CONSTRAINTS=$(mktemp)
  trap 'rm -f "$CONSTRAINTS"' EXIT
  echo "$TORCH" > "$CONSTRAINTS"
  "$CONVERT_PY" -m pip install --quiet -c "$CONSTRAINTS" "$TRANSFORMERS" safetensors numpy tqdm pyyaml requests
fi
# the converter imports sentencepiece before it looks for a tokenizer.model (none here: it then falls back
# to the BPE tokenizer.json), and the OpenVINO venv has none: a side folder on PYTHONPATH, that venv untouched
EXTRA=$CACHE/llama-convert-extra
if ! PYTHONPATH="$EXTRA" "$CONVERT_PY" -c "import sentencepiece" 2>/dev/null; then
  echo "converter extras: sentencepiece into $EXTRA"
  "$CONVERT_PY" -m pip install --quiet --target "$EXTRA" "sentencepiece>=0.1.98,<0.3.0"
fi
echo "converter python: $CONVERT_PY ($("$CONVERT_PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"))"

# 4. the conversion source folder (bench/peer_source.sh: checkpoint weights + reference config, dims checked)
SRC=$(bash "$ROOT/bench/peer_source.sh" "$MODEL" | tail -n 1)

# 5. the conversions (a few seconds each at 256M)
mkdir -p "$OUT"
convert() {  # out_file, converter args...
  local out=$1; shift
  if [ -f "$out" ] && [ -z "${FORCE:-}" ]; then echo "convert: $out exists"; return; fi
  echo "convert: $out"
  rm -f "$out" "$out.tmp"
  if ! PYTHONPATH="$LLAMA_CPP/gguf-py:$EXTRA${PYTHONPATH:+:$PYTHONPATH}" \
      "$CONVERT_PY" "$LLAMA_CPP/convert_hf_to_gguf.py" "$SRC" --outfile "$out.tmp" "$@" > "$out.log" 2>&1; then
    tail -n 30 "$out.log" >&2; echo "convert: FAILED ($out.log)" >&2; exit 1
  fi
  tail -n 1 "$out.log"
  mv "$out.tmp" "$out"                                          # only a finished file counts as done
}
convert "$OUT/text-bf16.gguf" --outtype bf16
convert "$OUT/text-q8_0.gguf" --outtype q8_0
convert "$OUT/text-f32.gguf" --outtype f32
convert "$OUT/mmproj-bf16.gguf" --outtype bf16 --mmproj
convert "$OUT/mmproj-f32.gguf" --outtype f32 --mmproj
ls -l "$OUT"
echo "done: bench/run.py now runs the engines llama.cpp and llama.cpp-q8_0 for $MODEL"
