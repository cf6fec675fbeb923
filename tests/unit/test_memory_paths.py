"""Peak-memory paths: zero-copy (copy-on-write mmap) loading, per-tensor conversion, chunked vision.

Each memory-saving path must give exactly the results of the plain path; the RSS checks run in a
child process so this process's allocations cannot hide or fake them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from smolvlm import SmolVLM, cpu
from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.weights.safetensors_io import CheckpointError, load_safetensors, read_safetensors_header
from tests.helpers import rss_growth


def tiny_config(vocab: int = 300, width: int = 64, mlp: int = 128, layers: int = 2, heads: int = 4) -> SmolVLMConfig:
    """A small model (half as many KV heads as heads); larger ones for the RSS checks."""
    return SmolVLMConfig(
        model_type="idefics3",
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
        text_config=TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                               max_position_embeddings=256, rope_theta=100000.0, tie_word_embeddings=False),
        image_token_id=vocab - 1, scale_factor=2, tie_word_embeddings=False,
    )


@pytest.fixture
def ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    d = tmp_path / "ckpt"
    SmolVLM.from_config(tiny_config()).save_pretrained(d)  # float32 on disk
    return d


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def state(model: SmolVLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- loading ------------------------------------------------------------------------------------
def test_same_dtype_aliases_file_mapping_and_other_paths_copy(ckpt, monkeypatch):
    """Tensors of at least ``ALIAS_MIN_BYTES`` alias the file mapping (lowered here for the tiny
    model: its 256-byte norms are read, its 76 KiB embedding aliased); other dtypes and ``mmap=False``
    copy everything; every path gives the same values."""
    from smolvlm.weights import safetensors_io

    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 4096)
    size = (ckpt / "model.safetensors").stat().st_size
    mapped = SmolVLM.from_pretrained(ckpt, dtype=torch.float32)
    copied = SmolVLM.from_pretrained(ckpt, dtype=torch.float32, mmap=False)
    converted = SmolVLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    # Aliased parameters are views of one storage spanning the whole file; copies own their bytes.
    sizes = {p.numel() * p.element_size() for p in mapped.parameters()}
    assert min(sizes) < 4096 <= max(sizes)  # both kinds are there
    for name, p in mapped.named_parameters():
        own = p.numel() * p.element_size()
        assert p.untyped_storage().nbytes() == (size if own >= 4096 else own), name
    for model in (copied, converted):
        for name, p in model.named_parameters():
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    a, b, c = state(mapped), state(copied), state(converted)
    for k in a:  # same values on every path (bf16: the round-to-nearest cast of the same fp32)
        assert_close(a[k], b[k], rtol=0, atol=0)
        assert_close(c[k], a[k].to(torch.bfloat16), rtol=0, atol=0)


def test_in_place_writes_are_copy_on_write(ckpt, monkeypatch):
    """Training writes parameters in place: the mapped file must never change (every tensor aliased
    here, whatever its size)."""
    from smolvlm.weights import safetensors_io

    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)
    f = ckpt / "model.safetensors"
    before = sha(f)
    model = SmolVLM.from_pretrained(ckpt)
    original = state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert sha(f) == before
    for k, v in SmolVLM.from_pretrained(ckpt).state_dict().items():
        assert_close(v, original[k], rtol=0, atol=0)
    # One optimizer step through autograd, as the train loop does.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]]))
    out.loss.backward()
    opt.step()
    assert sha(f) == before


def test_save_over_the_loaded_folder_is_safe(ckpt, monkeypatch):
    """save_pretrained replaces files atomically, so a model aliasing the old file can overwrite it."""
    from smolvlm.weights import safetensors_io

    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)  # every tensor of the tiny model aliased
    model = SmolVLM.from_pretrained(ckpt)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    expected = state(model)
    model.save_pretrained(ckpt)
    for k, v in state(model).items():  # the live model still reads its (old-inode) mapping
        assert_close(v, expected[k], rtol=0, atol=0)
    for k, v in SmolVLM.from_pretrained(ckpt).state_dict().items():
        assert_close(v, expected[k], rtol=0, atol=0)


def write_raw_safetensors(path: Path, tensors: dict[str, torch.Tensor], pad: int = 0) -> None:
    """A valid safetensors file whose data starts ``pad`` bytes after an 8-aligned header (unaligned data)."""
    header, blobs, off = {}, [], 0
    names = {torch.float32: "F32", torch.bfloat16: "BF16"}
    for k, t in tensors.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8 + pad)  # trailing spaces are valid JSON whitespace
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_unaligned_data_falls_back_to_reading(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7)}
    f = tmp_path / "x.safetensors"
    write_raw_safetensors(f, ts, pad=1)  # fp32 data at an odd offset cannot be viewed in place
    got = load_safetensors(f)
    for k in ts:
        assert_close(got[k], ts[k], rtol=0, atol=0)
        assert got[k].untyped_storage().nbytes() == ts[k].numel() * 4
    assert list(got) == ["a", "b"]


def test_header_matches_safetensors_library(tmp_path):
    f = tmp_path / "y.safetensors"
    ts = {"w": torch.randn(4, 3).to(torch.bfloat16), "s": torch.tensor(2.5), "e": torch.zeros(0, 4)}
    save_file(ts, str(f))
    infos = read_safetensors_header(f)
    assert {k: (i.dtype, i.shape) for k, i in infos.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in ts.items()}
    got = load_safetensors(f, keys={"w", "s", "e"}, dtype=torch.float32)
    for k in ts:
        assert_close(got[k], ts[k].float(), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["short", "length", "json", "range", "dtype"])
def test_corrupt_headers_raise_checkpoint_error(tmp_path, case):
    f = tmp_path / "bad.safetensors"
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if case == "short":
        f.write_bytes(b"\x01\x02")
    elif case == "length":
        f.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    elif case == "json":
        f.write_bytes(struct.pack("<Q", 4) + b"{no}")
    else:
        entry = dict(good["w"], **({"data_offsets": [0, 12]} if case == "range" else {"dtype": "X9"}))
        h = json.dumps({"w": entry}).encode()
        f.write_bytes(struct.pack("<Q", len(h)) + h + bytes(16))
    match = {"short": "not a safetensors file", "length": "header length", "json": "corrupt safetensors header",
             "range": "byte range", "dtype": "unreadable header entry"}[case]
    with pytest.raises(CheckpointError, match=match):
        read_safetensors_header(f)


def test_truncated_data_is_a_checkpoint_error(tmp_path):
    f = tmp_path / "t.safetensors"
    write_raw_safetensors(f, {"w": torch.randn(64)})
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not fit its shape or the file"):
        load_safetensors(f)


PEAK_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from smolvlm.weights.safetensors_io import load_safetensors
    path, mode = sys.argv[1], sys.argv[2]
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = peak()
    if mode == "alias":
        ts = load_safetensors(path, dtype=torch.float32)
    else:
        ts = load_safetensors(path, dtype=torch.bfloat16)
    total = sum(float(t.float().sum()) for t in ts.values())  # touch every byte, one tensor at a time
    print(json.dumps({"delta": peak() - before, "total": total}))
""")


@pytest.mark.parametrize("mode", ["alias", "convert"])
def test_peak_rss_is_one_copy(tmp_path, mode):
    """64 MiB of fp32 weights in 16 tensors. The same-dtype load holds them once (the file pages:
    measured ~68 MiB, a private copy on top gives ~132); the fp32 -> bf16 load holds the 32 MiB
    result plus one tensor at a time (measured ~44 MiB; keeping the mapped file while converting,
    as safe_open does, gives ~100). Bounds: one copy + 20 MiB for the 4 MiB float() temporary the
    check makes, per-tensor buffers and allocator/interpreter noise."""
    f = tmp_path / "w.safetensors"
    mib = 2**20
    save_file({f"t{i}": torch.randn(mib) for i in range(16)}, str(f))  # 16 x 4 MiB fp32
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(f), mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    delta = json.loads(out.stdout)["delta"] / mib
    bound = (64 if mode == "alias" else 32) + 20
    assert delta < bound, f"{mode}: peak grew by {delta:.1f} MiB (bound {bound})"


def test_quantized_load_never_holds_the_float_model(tmp_path):
    """``from_pretrained(quantize="int4")`` reads the text linears one layer at a time (each
    quantized before the next is read, glibc's freed blocks handed back between layers). A model
    of 304 MiB in fp32 (4 layers of 60 MiB, a 32 MiB embedding and head): the old path (load
    everything, then quantize) grew the RSS by 560-750 MiB (the float model, its int4 copy, the
    quantizer's temporaries and the blocks glibc kept); layer by layer, 270-315 MiB (the 86 MiB
    model, one 16 MiB float linear and ~64 MiB of quantizer temporaries, the rest libraries loaded
    on first use and allocator slack). The bound sits between, below the float model + 150 MiB."""
    big = tiny_config(vocab=8192, width=1024, mlp=4096, layers=4, heads=16)
    d = SmolVLM.from_config(big).save_pretrained(tmp_path / "big")
    delta, _ = rss_growth("from smolvlm import SmolVLM", 'SmolVLM.from_pretrained(sys.argv[1], quantize="int4")',
                          "None", str(d))
    assert delta < 450, f"quantized load grew the RSS by {delta:.1f} MiB at its peak (bound 450; the float model is 304)"


# -- vision chunking ----------------------------------------------------------------------------
def pixel_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2 samples x 4 slots of 32 px tiles: some padded within the tile, one padding slot (all zeros)."""
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(2, 4, 3, 32, 32, generator=g)
    pm = torch.ones(2, 4, 32, 32, dtype=torch.long)
    pm[0, 1, 20:] = 0  # bottom rows padded
    pm[1, 2, :, 12:] = 0  # right columns padded
    pv[1, 3] = 0.0  # a padding image: dropped
    pm[1, 3] = 0
    return pv, pm


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_vision_equals_unchunked(padded):
    """fp32: tiles never interact, so chunking changes no arithmetic, only the GEMM shapes. oneDNN/MKL
    pick their blocking (and so the order of the K-sum inside a dot product) from the row count, so
    on CPUs with AVX-512/AMX kernels chunk sizes 1-3 differ from one batch by up to 3e-7 (measured).
    The bound: a few fp32 ulps of the accumulated values (|x| ~ 1 after the final layer norm;
    eps = 1.2e-7, ~sqrt(K) ulps of reordering over K <= 128 reduction terms), far below any
    difference a real bug (a tile mixed into another, a wrong mask) makes (~1e-1)."""
    torch.manual_seed(0)
    model = SmolVLM.from_config(tiny_config())
    pv, pm = pixel_batch()
    if not padded:
        pm = torch.ones_like(pm)
    model.vision_chunk_size = None
    ref = model.get_image_features(pv, pm)
    assert ref.shape[0] == 7
    assert (ref[0] - ref[1]).abs().max() > 1e-2  # tiles differ far beyond the tolerance: a mix-up would show
    for chunk in (1, 2, 3, 4, 7, 100):
        model.vision_chunk_size = chunk
        assert_close(model.get_image_features(pv, pm), ref, rtol=1e-5, atol=2e-6)


def test_chunked_vision_gradients_match():
    """Training through the vision tower: chunking must not change gradients beyond fp32 summation order."""
    torch.manual_seed(0)
    model = SmolVLM.from_config(tiny_config()).train()
    pv, pm = pixel_batch()
    grads = []
    for chunk in (None, 2):
        model.zero_grad()
        model.vision_chunk_size = chunk
        model.get_image_features(pv, pm).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    # Weight gradients sum over tiles; chunking changes that summation's grouping only (fp32 rounding).
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_default_and_bad_chunk_size(monkeypatch):
    """Two tiles per vision batch on CPUs with AMX (oneDNN's tiles run two tiles' rows per call faster),
    one elsewhere; whatever this CPU is, both rules are checked."""
    from smolvlm.model import vlm

    for amx, want in ((True, 2), (False, 1)):
        monkeypatch.setattr(vlm.cpu, "has", lambda flag, amx=amx: amx and flag == "amx_tile")
        assert SmolVLM.from_config(tiny_config()).vision_chunk_size == want
    monkeypatch.undo()
    model = SmolVLM.from_config(tiny_config())
    assert model.vision_chunk_size == (2 if cpu.has("amx_tile") else 1)
    model.vision_chunk_size = 0
    with pytest.raises(ValueError, match="vision_chunk_size"):
        model.get_image_features(torch.randn(1, 1, 3, 32, 32))


# -- what a generation holds ----------------------------------------------------------------------
def _pagemap_linux() -> None:
    if not Path("/proc/self/pagemap").exists():
        pytest.skip("needs Linux's /proc/self/pagemap (smolvlm.memory.drop_file_pages is a no-op elsewhere)")


def test_drop_file_pages_unmaps_only_what_a_fault_maps_back(tmp_path):
    """``drop_file_pages``: a file mapping's clean pages are unmapped (the values read the same, from the
    page cache); pages written through a private mapping (copy-on-write: the only copy of that data)
    and ordinary anonymous memory are kept, values intact."""
    from smolvlm import memory

    _pagemap_linux()
    f = tmp_path / "t.bin"
    torch.arange(1 << 20, dtype=torch.float32).numpy().tofile(f)  # 4 MiB
    storage = torch.UntypedStorage.from_file(str(f), shared=False, nbytes=4 << 20)  # MAP_PRIVATE, as the loader
    t = torch.empty(0, dtype=torch.float32).set_(storage, 0, (1 << 20,))
    total = float(t.sum())
    t[1000:3000] = -1.0  # copy-on-write pages
    t[700_000] = -5.0
    assert float(t.sum()) != total  # maps the file's pages again (a write may unmap a large folio around it)
    assert memory.drop_file_pages(t) > 0
    assert memory.drop_file_pages(t) == 0  # nothing file-backed left mapped
    assert (t[1000:3000] == -1.0).all() and float(t[700_000]) == -5.0  # the written pages kept
    untouched = torch.arange(1 << 20, dtype=torch.float32)
    untouched[1000:3000] = -1.0
    untouched[700_000] = -5.0
    assert torch.equal(t, untouched)
    anon = torch.randn(1 << 20)
    before = anon.clone()
    assert memory.drop_file_pages(anon) == 0 and torch.equal(anon, before)


def test_generation_unmaps_the_embedding_rows_it_looked_up(ckpt, monkeypatch):
    """The loader registers the file-mapped token embedding; the prefill's and the generation's trims
    unmap the table pages that lookups mapped, and the answer is the same as with a private table."""
    from smolvlm import memory
    from smolvlm.generation.generate import generate_ids
    from smolvlm.weights import safetensors_io

    _pagemap_linux()
    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)
    monkeypatch.setattr(memory, "_TABLES", [])
    model = SmolVLM.from_pretrained(ckpt, dtype=torch.float32)
    table = model.model.text_model.embed_tokens.weight
    assert [r() for r in memory._TABLES] == [table]
    ids = torch.arange(5, 245, dtype=torch.long)[None]
    model.model.text_model.embed_tokens(ids)  # a lookup maps table pages
    assert memory.drop_file_pages(table) > 0
    model.model.text_model.embed_tokens(ids)
    out = generate_ids(model, ids, max_new_tokens=4, eos_token_id=[])
    assert memory.drop_file_pages(table) == 0  # already unmapped by the generation's trims
    private = SmolVLM.from_pretrained(ckpt, dtype=torch.float32, mmap=False)
    assert torch.equal(generate_ids(private, ids, max_new_tokens=4, eos_token_id=[]), out)


def test_generation_lets_the_pixels_go_once_the_images_are_encoded():
    """The prompt's forward runs without the pixel tensors: ``generate_ids`` and the token generator drop
    their references once the images are encoded (a caller that drops its own frees them)."""
    import gc
    import weakref

    from smolvlm.generation.generate import generate_ids

    torch.manual_seed(0)
    model = SmolVLM.from_config(tiny_config()).eval()
    n = model.config.image_seq_len
    ids = torch.tensor([[5] + [model.config.image_token_id] * n + [6, 7]])
    args = [torch.randn(1, 1, 3, 32, 32), torch.ones(1, 1, 32, 32, dtype=torch.bool)]
    alive = [weakref.ref(a) for a in args]
    seen = []
    embed = model.embed_inputs

    def spy(*a, **k):
        gc.collect()
        seen.append([r() is None for r in alive])
        return embed(*a, **k)

    model.embed_inputs = spy
    out = generate_ids(model, ids, None, args.pop(0), args.pop(0), max_new_tokens=2, eos_token_id=[])
    assert out.shape == (1, ids.shape[1] + 2) and seen[0] == [True, True]


@pytest.mark.parametrize("pack", [False, True])
def test_a_head_reading_the_table_keeps_it_mapped(tmp_path, monkeypatch, pack):
    """A tied lm_head that reads the table itself (unpacked) reads all of it every step: the table is
    not registered then. A packed head holds its own copy, so the table is only looked up: registered,
    when it is in the file's mapping (a table read into private memory has no file pages to give back)."""
    import dataclasses

    from smolvlm import memory
    from smolvlm.model.packed import PackedLinear, packing_available
    from smolvlm.weights import safetensors_io

    if pack and not packing_available(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN packing")
    monkeypatch.setattr(memory, "_TABLES", [])
    cfg = dataclasses.replace(tiny_config(), tie_word_embeddings=True)
    SmolVLM.from_config(cfg).save_pretrained(tmp_path / "tied")
    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)  # the tiny table aliases the mapping
    model = SmolVLM.from_pretrained(tmp_path / "tied", dtype=torch.float32, pack=pack)
    assert isinstance(model.lm_head, PackedLinear) == pack
    assert [r() for r in memory._TABLES] == ([model.model.text_model.embed_tokens.weight] if pack else [])
    memory._TABLES.clear()
    SmolVLM.from_pretrained(tmp_path / "tied", dtype=torch.float32, pack=pack, mmap=False)  # read, not mapped
    assert memory._TABLES == []


def test_a_model_without_embed_inputs_prefills_from_its_ids():
    """The prefill looks the prompt's rows up itself (``embed_inputs``) so the table's pages can go
    before the forward; a duck-typed model without that method gets its ids, with the same tokens."""
    from smolvlm.generation.generate import generate_ids

    torch.manual_seed(0)
    model = SmolVLM.from_config(tiny_config()).eval()
    calls = []

    class NoSplit:  # everything of the model but embed_inputs; records what each forward is given
        def __getattr__(self, name):
            if name == "embed_inputs":
                raise AttributeError(name)
            return getattr(model, name)

        def __call__(self, **kw):
            calls.append(sorted(k for k in ("input_ids", "inputs_embeds") if k in kw))
            return model(**kw)

    n = model.config.image_seq_len
    ids = torch.tensor([[5] + [model.config.image_token_id] * n + [6, 7]])
    pv = torch.randn(1, 1, 3, 32, 32)
    want = generate_ids(model, ids, None, pv, max_new_tokens=4, eos_token_id=[])
    got = generate_ids(NoSplit(), ids, None, pv, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(got, want) and calls[0] == ["input_ids"] and len(calls) == 4
