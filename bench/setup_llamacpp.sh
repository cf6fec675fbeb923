#!/usr/bin/env bash
# The llama.cpp peer for bench/run.py: llama-cpp-python 0.3.36 built from its PyPI source into
# bench/.cache/llama-venv (bench-only, never a project dependency). About 16 minutes on 2 cores.
# On CPUs with AMX, llama.cpp's default native build crashes (segfault) at the first eval in its
# AMX path, so GGML_NATIVE is off and every ISA up to AVX-512 BF16 is named, AMX excluded
# (../shared/PEERS.md). AVX-512 flags are only enabled where /proc/cpuinfo lists them.
#
#     bash bench/setup_llamacpp.sh          # this CPU's ISAs (bench/.cache/llama-venv)
#     bash bench/setup_llamacpp.sh avx2     # AVX2 + FMA + F16C only, whatever this CPU has
#                                           # (bench/.cache/llama-venv-avx2: bench/run.py --isa avx2)
set -euo pipefail
cd "$(dirname "$0")/.."
ISA="${1:-native}"
case "$ISA" in native) VENV=bench/.cache/llama-venv ;; avx2) VENV=bench/.cache/llama-venv-avx2 ;;
    *) echo "usage: $0 [avx2]" >&2; exit 2 ;; esac
if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "$VENV already has llama_cpp"; exit 0
fi
python3 -m venv "$VENV"
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"
if [ "$ISA" = avx2 ]; then
    flags="$flags -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF"
else
    if grep -qw avx512f /proc/cpuinfo; then flags="$flags -DGGML_AVX512=ON"; fi
    if grep -qw avx512_vnni /proc/cpuinfo; then flags="$flags -DGGML_AVX512_VNNI=ON"; fi
    if grep -qw avx512_bf16 /proc/cpuinfo; then flags="$flags -DGGML_AVX512_BF16=ON"; fi
fi
CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=2 "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python==0.3.36" numpy
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
