"""Checkpoint I/O: strict loading errors, meta-device loading, sharding, dtype, safe re-save, hub errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import smolvlm.hub as hub
import smolvlm.weights.save as save_mod
from smolvlm import SmolVLM
from smolvlm.weights.load import resolve_dtype
from smolvlm.weights.safetensors_io import CheckpointError
from tests.helpers import logits, tiny_config


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    SmolVLM.from_config(tiny_config()).save_pretrained(d)
    return d


def rewrite(d: Path, edit) -> None:
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def test_round_trip_single_file(ckpt):
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    a = SmolVLM.from_pretrained(ckpt)
    b = SmolVLM.from_pretrained(ckpt)
    assert_close(logits(a), logits(b), rtol=0, atol=0)
    assert a.generation_config is None


def test_strict_error_lists_everything(ckpt):
    def edit(sd):
        del sd["model.connector.modality_projection.proj.weight"]
        del sd["model.text_model.norm.weight"]
        sd["model.vision_model.head.probe"] = torch.zeros(3)
        sd["model.text_model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 4)

    rewrite(ckpt, edit)
    with pytest.raises(CheckpointError) as e:
        SmolVLM.from_pretrained(ckpt)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "2 missing (model.connector.modality_projection.proj.weight, model.text_model.norm.weight)" in msg
    assert "1 unexpected (model.vision_model.head.probe)" in msg
    assert "1 with the wrong shape (model.text_model.layers.1.mlp.up_proj.weight: weights [3, 4], model [128, 64])" in msg
    assert "Probable cause" not in msg  # one odd tensor is no evidence about the config


@pytest.mark.parametrize("case", ["drop", "add", "shape"])
def test_each_strict_error_alone(ckpt, case):
    key = "model.vision_model.encoder.layers.0.self_attn.k_proj.bias"
    edits = {"drop": lambda sd: sd.pop(key), "add": lambda sd: sd.update(extra=torch.ones(1)),
             "shape": lambda sd: sd.update({key: torch.ones(33)})}
    rewrite(ckpt, edits[case])
    with pytest.raises(CheckpointError, match={"drop": rf"1 missing \({key}\)$", "add": r"1 unexpected \(extra\)$",
                                               "shape": rf"1 with the wrong shape \({key}: weights \[33\], model \[32\]\)"}[case]):
        SmolVLM.from_pretrained(ckpt)


def test_inv_freq_keys_ignored(ckpt):
    rewrite(ckpt, lambda sd: sd.update({"model.text_model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    SmolVLM.from_pretrained(ckpt)


def test_tied_checkpoint_without_lm_head(tmp_path):
    SmolVLM.from_config(tiny_config(tie=True)).save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    m = SmolVLM.from_pretrained(tmp_path)
    assert m.lm_head.weight is m.model.text_model.embed_tokens.weight
    # Untied config + no lm_head in the file is an error.
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"1 missing \(lm_head.weight\)"):
        SmolVLM.from_pretrained(tmp_path)


def test_loading_never_materialises_random_weights(ckpt, monkeypatch):
    devices = []
    orig = torch.nn.Linear.reset_parameters

    def spy(self):
        devices.append(self.weight.device.type)
        orig(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    m = SmolVLM.from_pretrained(ckpt)
    assert devices and set(devices) == {"meta"}
    assert not any(p.is_meta for p in m.parameters())


def test_sharded_round_trip_and_transformers_loads_it(tmp_path):
    import transformers

    m = SmolVLM.from_config(tiny_config("smolvlm"))
    m.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(m.state_dict())
    back = SmolVLM.from_pretrained(tmp_path)
    assert_close(logits(back), logits(m), rtol=0, atol=0)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ref(input_ids=ids, pixel_values=pv).logits, logits(m), rtol=1e-5, atol=1e-5)


def test_resave_changes_layout_and_keeps_other_files(tmp_path):
    m = SmolVLM.from_config(tiny_config())
    m.save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    m.save_pretrained(tmp_path)  # now a single file: the old shards and index must go
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    SmolVLM.from_pretrained(tmp_path)


def test_failed_save_keeps_existing_checkpoint(ckpt, monkeypatch):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(save_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        SmolVLM.from_config(tiny_config()).save_pretrained(ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]  # temp folder cleaned up


def test_dtype_options_and_generation_config(tmp_path):
    m = SmolVLM.from_config(tiny_config(dtype="bfloat16"), dtype=torch.bfloat16)
    m.generation_config = {"bos_token_id": 0, "eos_token_id": 49279, "pad_token_id": 2}
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert SmolVLM.from_pretrained(tmp_path).dtype == torch.float32  # None = float32
    auto = SmolVLM.from_pretrained(tmp_path, dtype="auto")
    assert auto.dtype == torch.bfloat16
    assert auto.generation_config == m.generation_config
    assert SmolVLM.from_pretrained(tmp_path, dtype=torch.float16).dtype == torch.float16
    # A float32 model saved from it records float32, so "auto" round-trips the stored dtype.
    SmolVLM.from_pretrained(tmp_path).save_pretrained(tmp_path / "f32")
    assert SmolVLM.from_pretrained(tmp_path / "f32", dtype="auto").dtype == torch.float32
    assert json.loads((tmp_path / "f32" / "generation_config.json").read_text())["eos_token_id"] == 49279
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int8", tiny_config())


def test_missing_things_give_clear_errors(tmp_path, ref256, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        SmolVLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        SmolVLM.from_pretrained(ref256)  # the published 256M config set ships no weights here

    def offline(repo_id, revision):
        raise ConnectionError("no network")

    monkeypatch.setattr(hub, "_snapshot_download", offline)
    with pytest.raises(hub.CheckpointDownloadError, match="could not download 'HuggingFaceTB/SmolVLM-256M-Instruct'.*local directory"):
        SmolVLM.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")


def test_repo_id_goes_through_snapshot_download(ckpt, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "_snapshot_download", lambda repo_id, revision: calls.append(repo_id) or str(ckpt))
    m = SmolVLM.from_pretrained("someone/tiny-smolvlm")
    assert calls == ["someone/tiny-smolvlm"] and m.config.text_config.hidden_size == 64


def test_processor_repo_id_downloads_processor_files_only(ref256, monkeypatch):
    """The processor shares the weights' hub resolver but asks only for config/tokenizer files."""
    from smolvlm.processing.processor import SmolVLMProcessor

    calls = []
    monkeypatch.setattr(hub, "_snapshot_download",
                        lambda repo_id, revision, allow_patterns: calls.append(allow_patterns) or str(ref256))
    proc = SmolVLMProcessor.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")
    assert proc.image_seq_len == 64
    assert calls == [hub.PROCESSOR_PATTERNS] and not any("safetensors" in p for p in calls[0])


def test_offline_processor_error_is_one_line(monkeypatch):
    from smolvlm.processing.processor import SmolVLMProcessor

    def offline(repo_id, revision, allow_patterns):
        raise OSError("Name or service not known\nsecond line of a hub error")

    monkeypatch.setattr(hub, "_snapshot_download", offline)
    with pytest.raises(hub.CheckpointDownloadError) as e:
        SmolVLMProcessor.from_pretrained("someone/some-model")
    assert "\n" not in str(e.value) and "someone/some-model" in str(e.value)


def test_config_weights_mismatch_is_summarised(ckpt):
    """A config whose hidden_size disagrees with the weights used to print every tensor (26 KB for
    the 256M model); now: counts, the first names and the field that disagrees."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 96
    cfg["text_config"]["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        SmolVLM.from_pretrained(ckpt)
    msg = str(e.value)
    assert len(msg) < 900 and "\n" not in msg, msg
    assert "more)" in msg  # the long lists are cut
    assert "text_config.hidden_size in config.json is 96, the weights have 64" in msg
    assert "the config builds 3 layers in model.text_model.layers, the weights have 2" in msg


def test_foreign_checkpoint_is_named_as_such(ckpt):
    save_file({"transformer.h.0.attn.weight": torch.zeros(2, 2)}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="no tensor name in common"):
        SmolVLM.from_pretrained(ckpt)


def test_corrupt_header_error_is_short(ckpt):
    """A header entry of 20 KB (a corrupt or hostile file) is not echoed whole."""
    import struct

    header = json.dumps({"w" * 20_000: {"dtype": "F32", "shape": ["x" * 20_000], "data_offsets": [0, 4]}}).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError) as e:
        SmolVLM.from_pretrained(ckpt)
    assert "unreadable header entry" in str(e.value) and len(str(e.value)) < 500


def test_missing_config_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        SmolVLM.from_pretrained(tmp_path)


def test_read_into_fills_rows_of_a_larger_tensor(tmp_path):
    """``safetensors_io.read_into``: a packed q/k/v layer reads each part into its rows of the fused
    weight; the stored dtype goes in as bytes, another dtype is converted; a wrong shape is refused."""
    from safetensors.torch import save_file

    from smolvlm.weights.safetensors_io import read_into

    a, b = torch.randn(3, 8).to(torch.bfloat16), torch.randn(2, 8)
    save_file({"a": a, "b": b}, str(tmp_path / "w.safetensors"))
    fused = torch.zeros(5, 8, dtype=torch.bfloat16)
    read_into(tmp_path / "w.safetensors", "a", fused[:3])
    read_into(tmp_path / "w.safetensors", "b", fused[3:])  # float32 on disk: converted
    assert torch.equal(fused, torch.cat([a, b.to(torch.bfloat16)]))
    with pytest.raises(ValueError, match=r"cannot read a \[3, 8\] into a \[2, 8\]"):
        read_into(tmp_path / "w.safetensors", "a", fused[3:])


def test_loading_builds_the_tree_without_running_initialisers(ckpt):
    """The loader builds the module tree on meta with ``torch.nn.init`` switched off (``on_meta``):
    ``normal_`` of a meta tensor imports torch._dynamo and sympy (67 MiB of Python modules), so a
    process that loads a model and answers must never import them; the initialisers are restored,
    also when building fails, and random models still get their initialisation."""
    import subprocess
    import sys
    import textwrap

    from smolvlm.weights import load as load_mod

    code = textwrap.dedent(f"""
        import sys, torch
        from smolvlm import SmolVLM
        from smolvlm.generation.generate import generate_ids
        model = SmolVLM.from_pretrained({str(ckpt)!r})
        generate_ids(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2)
        print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    normal = torch.nn.init.normal_
    with pytest.raises(RuntimeError, match="boom"):
        with load_mod.on_meta():
            assert torch.nn.init.normal_ is not normal and torch.nn.Embedding(3, 2).weight.is_meta
            raise RuntimeError("boom")
    assert torch.nn.init.normal_ is normal
    cfg = tiny_config()
    w = SmolVLM.from_config(cfg).model.text_model.embed_tokens.weight.detach()
    assert abs(float(w.std()) - cfg.text_config.initializer_range) < 0.02  # normal(0, initializer_range)
