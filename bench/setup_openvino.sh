#!/usr/bin/env bash
# Bench-only OpenVINO peer (optimum-intel) for bench/run.py: a separate venv plus OpenVINO exports of
# the random-weight real-size checkpoint. Never a project dependency; everything lands in the
# gitignored bench/.cache. Idempotent: each step is skipped when its output already exists
# (FORCE=1 redoes the exports).
#
#     bash bench/setup_openvino.sh            # venv + exports for 256M
#     bash bench/setup_openvino.sh 500M       # exports for another size (needs bench/.cache/500M/ckpt)
#
# Traps handled here (shared/PEERS.md, "OpenVINO"):
# - a plain `torch` requirement pulls a multi-GB CUDA build: install the local CPU torch first and
#   keep it pinned with a constraints file for everything after it;
# - optimum-intel refuses to export idefics3 with transformers newer than 4.57.6;
# - the torchvision wheel pulled in is linked against CUDA torch and breaks every transformers
#   import (`operator torchvision::nms does not exist`): uninstall it (nothing here uses it);
# - transformers 4.57 does not read `rope_parameters` from a config.json written by transformers
#   5.x (bench/.cache/<model>/ckpt), so an export straight from the checkpoint silently uses
#   rope_theta 10000 instead of 100000: export from bench/peer_source.sh's folder (the checkpoint's
#   weights + the reference config.json with a top-level rope_theta, dims checked).
set -euo pipefail

MODEL=${1:-256M}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$ROOT/bench/.cache
VENV=${OPENVINO_VENV:-$CACHE/openvino-venv}  # bench/run.py looks for it here
PY=$VENV/bin/python
TORCH=torch==2.13.0
# the versions this harness was verified with (bench/_harness/openvino_child.py)
PKGS=("optimum-intel[openvino]==2.2.0" "optimum==2.3.0" "openvino==2026.4.1" "openvino-tokenizers==2026.4.1.0"
      "nncf==3.4.0" "transformers==4.57.6")

# 1. the venv
if "$PY" -c "import openvino, optimum.intel, transformers" 2>/dev/null; then
  echo "venv: $VENV exists"
else
  echo "venv: creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$TORCH"                       # the local CPU wheel
  CONSTRAINTS=$(mktemp)
  trap 'rm -f "$CONSTRAINTS"' EXIT
  echo "$TORCH" > "$CONSTRAINTS"
  "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" "${PKGS[@]}"
  "$VENV/bin/pip" uninstall --quiet -y torchvision || true
  "$PY" -c "import openvino, optimum.intel, transformers"        # fails loudly if the venv is broken
fi
"$PY" - <<'EOF'
from importlib.metadata import version
print("versions: " + ", ".join(f"{p} {version(p)}" for p in
      ("openvino", "optimum-intel", "optimum", "transformers", "nncf", "torch")))
EOF

# 2. the export source folder (bench/peer_source.sh: checkpoint weights + reference config, dims checked)
SRC=$(bash "$ROOT/bench/peer_source.sh" "$MODEL" | tail -n 1)

# 3. the exports (fp: weights as stored, bf16 here; int8: weight-only int8)
export_one() {  # out_dir, extra optimum-cli args...
  local out=$1; shift
  if [ -f "$out/openvino_language_model.xml" ] && [ -z "${FORCE:-}" ]; then
    echo "export: $out exists"; return
  fi
  echo "export: $out"
  rm -rf "$out"
  "$VENV/bin/optimum-cli" export openvino --model "$SRC" --task image-text-to-text "$@" "$out"
}
export_one "$CACHE/$MODEL/ov-fp"
export_one "$CACHE/$MODEL/ov-int8" --weight-format int8
echo "done: bench/run.py now runs the engines openvino and openvino-int8 for $MODEL"
