"""The opt-in compiled decode step (``generation/compiled.py``) against the eager one.

Inductor fuses the small ops (RMSNorm, RoPE, SiLU-gate, adds) and may reorder their float
reductions; the GEMVs are the same kernels. So logits agree to float32 rounding (1e-4 absolute at
O(1) values, 2e-2 in bf16: a few ulps) and greedy tokens must be identical on these tiny random
models, whose top-2 margins are far above that.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from smolvlm import SmolVLM, kernels
from smolvlm.generation import compiled
from smolvlm.generation.generate import generate_ids, generate_tokens
from smolvlm.model.packed import packing_available
from tests.helpers import tiny_config

PROMPT = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])


def _model(dtype: torch.dtype = torch.float32, pack: bool = False) -> SmolVLM:
    torch.manual_seed(0)
    m = SmolVLM.from_config(tiny_config("smolvlm")).to(dtype).eval()
    return m.pack_for_inference() if pack else m


def _greedy(model: SmolVLM, n: int = 12) -> list[int]:
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    return generate_ids(model, PROMPT, pixel_values=pv, max_new_tokens=n, eos_token_id=[])[0].tolist()


def test_cache_slots_round_up_to_the_bucket():
    assert [compiled.cache_slots(n) for n in (1, 255, 256, 257, 900)] == [256, 256, 256, 512, 1024]


def test_compiled_greedy_tokens_and_logits_match_eager():
    model = _model()
    eager = _greedy(model)
    step = compiled.enable(model)
    assert step.problem is None, f"{step.problem}; run `bash tools/install-chromium.sh` (apt-get install g++)"
    assert _greedy(model) == eager
    assert step.buckets == {(1, 256)}  # 7 + 12 positions -> one 256-slot bucket, compiled once
    assert _greedy(model, n=30) == _greedy(_model(), n=30)  # a fresh eager model, the same weights
    assert step.buckets == {(1, 256)}  # a longer answer in the same bucket: no new compile

    # the step itself: compiled logits against the eager model's at the same cache state
    cache = model.new_kv_cache(1, 256)
    mask = torch.ones(1, 256, dtype=torch.long)
    with torch.inference_mode():
        model(input_ids=PROMPT, kv_cache=cache, input_pos=torch.arange(7), attention_mask=mask[:, :7])
        ref_cache = model.new_kv_cache(1, 256)
        for a, b in zip(ref_cache.k + ref_cache.v, cache.k + cache.v):
            a.copy_(b)
        tok, pos = torch.tensor([[11]]), torch.tensor([[7]])
        got = step(tok, mask, pos, torch.tensor([7]), cache)
        want = model(input_ids=tok, attention_mask=mask[:, :8], position_ids=pos, kv_cache=ref_cache,
                     input_pos=torch.tensor([7])).logits[:, -1].float()
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_close(cache.k[1][:, :, 7], ref_cache.k[1][:, :, 7], rtol=1e-4, atol=1e-4)  # the step wrote its slot
    compiled.disable(model)
    assert not hasattr(model, "compiled_decode")


def test_compiled_batch_with_left_padding_matches_eager():
    """Two rows, one left-padded: the mask over the whole bucket keeps the padding out."""
    model = _model()
    ids = torch.tensor([[0, 0, 5, 7, 8], [5, 9, 7, 8, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    eager = generate_ids(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    compiled.enable(model)
    assert torch.equal(generate_ids(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), eager)


def test_packed_bf16_compiles_through_the_opaque_oneDNN_ops():
    """Packed linears (where this CPU packs bf16) run inside the graph as ``smolvlm::packed_linear``;
    elsewhere the plain bf16 model is compiled. Tokens match the eager model either way."""
    pack = packing_available(torch.bfloat16)
    model = _model(torch.bfloat16, pack=pack)
    eager = _greedy(model)
    step = compiled.enable(model)
    assert _greedy(model) == eager and step.problem is None, (pack, step.problem)


@pytest.mark.skipif(kernels._cpu_problem() is not None, reason=f"no CPU kernels here: {kernels._cpu_problem()}")
def test_the_bf16_gemv_runs_inside_the_compiled_step(monkeypatch):
    """A bf16 model on a CPU without fast bf16 GEMMs (its linears ``UpcastLinear``, forced here on every
    CPU): decode's GEMVs, q/k/v and gate/up together, are smolvlm's bf16 GEMV inside the graph too
    (seen in the profiler), with the eager tokens."""
    from smolvlm import kernels as k
    from smolvlm.model.upcast import upcast_slow_bf16

    assert k.build() is None
    monkeypatch.setitem(k._state, "use", None)
    monkeypatch.setitem(k._state, "gemv", None)
    model = _model(torch.bfloat16)
    upcast_slow_bf16(model, force=True)
    eager = _greedy(model)
    step = compiled.enable(model)
    with torch.profiler.profile() as prof:
        assert _greedy(model) == eager and step.problem is None, step.problem
    names = {e.name for e in prof.events()}
    assert {"smolvlm::bf16_gemv", "smolvlm::bf16_gemv_cat"} <= names and step.buckets


def test_no_compiler_says_so_once_and_decodes_eagerly(monkeypatch, capsys):
    model = _model()
    eager = _greedy(model)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    step = compiled.enable(model)
    assert step.problem and "C++ compiler" in step.problem
    assert _greedy(model) == eager
    err = capsys.readouterr().err
    assert err.count("compiled decode off") == 1 and "apt install g++" in err


def test_a_failing_compile_falls_back_to_the_same_tokens(monkeypatch, capsys):
    model = _model()
    eager = _greedy(model)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("C++ compile failed: cc1plus killed")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    step = compiled.enable(model)
    assert _greedy(model) == eager
    assert "cc1plus killed" in step.problem and capsys.readouterr().err.count("compiled decode off") == 1
    assert list(generate_tokens(model, PROMPT, max_new_tokens=3, eos_token_id=[]))  # still fine afterwards


@pytest.mark.parametrize("compile_mode", ["default", "max-autotune"])
def test_quantized_models_compile_to_their_eager_tokens(compile_mode):
    """int8 and int4 weight-only linears inside the compiled graph: their own torch kernels in the
    default mode; in max-autotune the frozen int8/int4 weights may go to Inductor's
    weight-only-quantized GEMM templates instead (float rounding only)."""
    from smolvlm.quantization import quantize, quantized_modules

    for mode in ("int8", "int4"):
        model = quantize(_model(torch.bfloat16), mode)
        assert quantized_modules(model)
        eager = _greedy(model)
        step = compiled.enable(model, mode=compile_mode)
        assert _greedy(model) == eager and step.problem is None, (mode, step.problem)


def test_max_autotune_mode_freezes_dense_weights_and_keeps_the_tokens():
    """mode="max-autotune": the packed text linears become dense again (fused groups stay fused),
    Inductor freezes them and may generate its own GEMMs (C++ templates). Its summation order
    differs from oneDNN's by float rounding, far below these tiny models' top-2 margins, so greedy
    tokens are identical; the checkpoint view (state_dict) is unchanged by the unpacking."""
    from smolvlm.model.packed import DenseFused, PackedLinear

    pack = packing_available(torch.bfloat16)
    model = _model(torch.bfloat16, pack=pack)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eager = _greedy(model)
    step = compiled.enable(model, mode="max-autotune")
    assert step.problem is None, step.problem
    text = [m for n, m in model.named_modules() if n.startswith(("model.text_model.", "lm_head"))]
    assert not any(isinstance(m, PackedLinear) for m in text)
    assert any(isinstance(m, DenseFused) for m in text) == pack  # q/k/v and gate/up stay one GEMM each
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert _greedy(model) == eager
    assert step.buckets == {(1, 256)}


def test_max_autotune_on_weights_that_view_a_larger_storage(tmp_path, monkeypatch):
    """A checkpoint loaded unpacked aliases its file mapping: each weight is a view at an offset
    into one storage. Inductor's C++ GEMM template (freezing, torch 2.13) reads such a weight from
    the storage's start: NaN logits, token 0 over and over, on an AVX-512 AMD EPYC where the template
    won the autotuning. ``own_storage`` gives those weights their own copy. Only the template is
    offered here ("CPP"), so this runs it on every CPU, not only where it wins the timing. (The tiny
    weights are below ``ALIAS_MIN_BYTES``: lowered here so they alias as full-size ones do.)"""
    from smolvlm.weights import safetensors_io

    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)
    _model().save_pretrained(tmp_path)
    model = SmolVLM.from_pretrained(tmp_path).eval()  # float32, unpacked: views of the mapping
    assert model.model.text_model.layers[0].self_attn.k_proj.weight.storage_offset() != 0  # the case
    eager = _greedy(model)
    monkeypatch.setitem(compiled.MODES, "max-autotune",
                        {**compiled.MODES["max-autotune"], "max_autotune_gemm_backends": "CPP"})
    step = compiled.enable(model, mode="max-autotune")
    assert _greedy(model) == eager and step.problem is None, step.problem
    linears = [m for n, m in model.named_modules() if n.startswith(("model.text_model.", "lm_head"))
               and isinstance(m, torch.nn.Linear)]
    assert linears and all(p.storage_offset() == 0 for m in linears for p in m.parameters(recurse=False))


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="max-autotune"):
        compiled.enable(_model(), mode="fastest")


def test_a_model_changed_after_compiling_decodes_eagerly(capsys):
    """The compiled step skips Dynamo's per-call guards on the model's modules; ``check`` (once per
    generation) stands in for them. Unchanged, the compiled step keeps running, generation after
    generation (eager prefills of other lengths included, which fill layers' private caches). A
    swapped module or a changed dtype: the next generation says so once and decodes eagerly, giving
    the changed model's own eager tokens (never the stale graph's)."""
    from smolvlm.quantization import quantize

    model = quantize(_model(torch.bfloat16), "int8")
    step = compiled.enable(model)
    calls = []
    real = step._compiled
    step._compiled = lambda *a: calls.append(1) or real(*a)
    first = _greedy(model)
    long_prompt = torch.tensor([[5] + [299] * 20 + [7, 8]])
    generate_ids(model, long_prompt, max_new_tokens=4, eos_token_id=[])
    assert _greedy(model) == first and step.problem is None and len(calls) == 11 + 3 + 11
    assert compiled.fingerprint(model) == step._fingerprint

    layer = model.model.text_model.layers[0].mlp
    layer.down_proj = torch.nn.Linear(layer.down_proj.in_features, layer.down_proj.out_features, bias=False,
                                      dtype=torch.bfloat16)
    changed = _greedy(model)
    assert step.problem == "the model changed after its decode step was compiled" and len(calls) == 25
    assert capsys.readouterr().err.count("model changed") == 1
    compiled.disable(model)
    assert changed == _greedy(model)  # the eager tokens of the changed model
    assert compiled.fingerprint(model) != step._fingerprint
    other = _model(torch.float32)  # same structure, other dtype, same process: its own graph
    eager = _greedy(other)
    assert compiled.enable(other).problem is None and _greedy(other) == eager
