"""llama.cpp decode speed on a GGUF, for bench/run.py. Runs in bench/.cache/llama-venv (never a
project dependency): ``bench/.cache/llama-venv/bin/python bench/llamacpp_decode.py SPEC_JSON``.

SPEC_JSON: {"gguf": path, "engine": name (default "llama.cpp-Q4_1"), "prompt": [ids], "n_new": N, "threads": 2, "agree": [[ids]...], "agree_new": M,
"forced": [[ids]...]}. The prompt ids are evaluated once (prefill), then N greedy steps of one token
each (argmax of the last logits, no early stop), exactly like our side. Decode tokens/s = N / time
of those N single-token evals (warm-up run first). For each agreement prompt: M free-running greedy
tokens, and the teacher-forced argmax along the reference continuation in ``forced`` (one batch
eval with logits kept for every position). Prints ``RESULT {json}`` with the tokens and the peak
RSS of this process.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    import numpy as np
    from llama_cpp import Llama

    prompt, n_new, agree_new = spec["prompt"], spec["n_new"], spec.get("agree_new", 32)
    n_ctx = max([len(prompt) + n_new] + [len(p) + agree_new for p in spec.get("agree", [])]) + 8
    llm = Llama(model_path=spec["gguf"], n_threads=spec.get("threads", 2), n_threads_batch=spec.get("threads", 2),
                n_ctx=n_ctx, logits_all=False, verbose=False)

    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        # logits_all=False: llama-cpp-python no longer copies them into ``scores``; read the
        # context's buffer (the last evaluated token's row) directly, no copy.
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def run(n: int, prompt: list[int] = prompt) -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t_prefill = time.perf_counter() - t0
        tokens = []
        tok = last_argmax()
        t0 = time.perf_counter()
        for _ in range(n):
            tokens.append(tok)
            llm.eval([tok])
            tok = last_argmax()
        return t_prefill, time.perf_counter() - t0, tokens

    run(4)  # warm-up
    t_prefill, t_decode, tokens = run(n_new)
    greedy = [run(agree_new, p)[2] for p in spec.get("agree", [])]
    forced = None
    if spec.get("forced"):
        # a second context that keeps the logits of every position (the timed one keeps the last only)
        longest = max(len(p) + len(c) for p, c in zip(spec["agree"], spec["forced"]))
        full = Llama(model_path=spec["gguf"], n_threads=spec.get("threads", 2), n_threads_batch=spec.get("threads", 2),
                     n_ctx=longest + 8, logits_all=True, verbose=False)
        forced = []
        for p, c in zip(spec["agree"], spec["forced"]):
            full.reset()
            full.eval(p + c[:-1])
            scores = np.asarray(full.scores[: len(p) + len(c) - 1])  # (tokens, vocab)
            forced.append([int(i) for i in scores[len(p) - 1:].argmax(-1)])
    print("RESULT " + json.dumps({
        "engine": spec.get("engine", "llama.cpp-Q4_1"), "decode_tok_s": n_new / t_decode, "prefill_tok_s": len(spec["prompt"]) / t_prefill,
        "tokens": tokens, "greedy": greedy, "forced": forced, "threads": spec.get("threads", 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()
