#!/usr/bin/env bash
# The folder the peers' converters read (OpenVINO's optimum-cli export, llama.cpp's
# convert_hf_to_gguf.py): bench/.cache/<model>/ov-src = the random-weight checkpoint's weights
# (symlinks) + the reference config/tokenizer/processor files. Used by bench/setup_openvino.sh and
# bench/setup_llamacpp_vlm.sh; prints the folder's path as its last line.
#
# Why not the checkpoint folder itself: its config.json is written by transformers 5.x
# (rope_parameters), which transformers 4.57 (what both converters need) does not read: it silently
# falls back to rope_theta 10000 instead of 100000 and the converted model is wrong. The reference
# config.json has a top-level rope_theta; the dims are checked against the checkpoint's first.
set -euo pipefail

MODEL=${1:-256M}
case "$MODEL" in
  256M) NAME=SmolVLM-256M-Instruct ;;
  500M) NAME=SmolVLM-500M-Instruct ;;
  2.2B) NAME=SmolVLM-Instruct ;;
  *) echo "unknown model size '$MODEL' (256M, 500M or 2.2B)" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REF=$(realpath -m "${SMOLVLM_REFERENCE_DIR:-$ROOT/../shared/reference}/$NAME")
CKPT=$ROOT/bench/.cache/$MODEL/ckpt
SRC=$ROOT/bench/.cache/$MODEL/ov-src

[ -f "$CKPT/config.json" ] || { echo "$CKPT missing: build it with .venv/bin/python bench/parity_full_size.py --models $MODEL" >&2; exit 1; }
[ -f "$REF/config.json" ] || { echo "$REF missing (reference config/tokenizer files)" >&2; exit 1; }
mkdir -p "$SRC"
for f in "$CKPT"/*.safetensors "$CKPT"/*.safetensors.index.json "$REF"/*.json "$REF"/*.txt "$REF"/*.jinja; do
  [ -e "$f" ] && ln -sfn "$f" "$SRC/$(basename "$f")"
done
python3 - "$CKPT/config.json" "$SRC/config.json" <<'PY'
import json, sys
ck, ref = (json.load(open(p)) for p in sys.argv[1:3])
keys = {"": ["model_type", "scale_factor", "image_token_id"],
        "text_config": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings"],
        "vision_config": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "image_size", "patch_size"]}
bad = []
for sub, ks in keys.items():
    a, b = (ck.get(sub, {}), ref.get(sub, {})) if sub else (ck, ref)
    bad += [f"{sub}.{k}: ckpt {a.get(k)} != ref {b.get(k)}" for k in ks if k in a and a.get(k) != b.get(k)]
text = ck.get("text_config", {})
theta = text.get("rope_parameters", {}).get("rope_theta", text.get("rope_theta"))
if "rope_theta" not in ref.get("text_config", {}):
    bad.append("reference config.json has no top-level text_config.rope_theta")
elif theta is not None and theta != ref["text_config"]["rope_theta"]:
    bad.append(f"rope_theta: ckpt {theta} != ref {ref['text_config']['rope_theta']}")
if bad:
    sys.exit("converter source: checkpoint and reference configs differ:\n  " + "\n  ".join(bad))
print(f"converter source: dims match the reference config (rope_theta {ref['text_config']['rope_theta']})")
PY
echo "$SRC"
