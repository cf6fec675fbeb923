"""Tokenizer: the checkpoint's ``tokenizer.json`` through the ``tokenizers`` library (SPEC §3.5, §3.6).

Mirrors what transformers 5.23 ``AutoTokenizer`` builds for SmolVLM checkpoints:

* Special tokens (bos/eos/pad/unk/additional) come from ``tokenizer_config.json``, never from
  ``special_tokens_map.json`` (which names the wrong EOS in the published 256M files).
* No BOS/EOS is added by ``encode`` (the files have no post-processor).
* ``decode(skip_special_tokens=True)`` drops every added token flagged special (all 145 added
  tokens of the 49280 vocab, incl. ``<global-img>`` and row/col markers), as ``tokenizers`` does.
* Pre-tokenizer quirk of 5.23: for ``model_type: idefics3`` checkpoints whose
  ``tokenizer_config.json`` says ``tokenizer_class: GPT2Tokenizer`` (SmolVLM-256M/500M/Instruct),
  5.23 instantiates ``GPT2Tokenizer``, which rebuilds the pipeline with a plain
  ``ByteLevel(add_prefix_space)`` pre-tokenizer and ``ByteLevel`` decoder: the ``Digits``
  pre-tokenizer of ``tokenizer.json`` is dropped. Ids differ only where whitespace precedes a
  digit (``"a  1"`` -> ``[81, 216, 216, 33]`` instead of ``[81, 256, 33]``). SmolVLM2
  (``model_type: smolvlm``) is on 5.23's ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`` list and
  keeps ``tokenizer.json`` verbatim. ``pre_tokenizer="file"`` keeps the file's pipeline always.

``encode`` is the reference's: every added-token string in the text becomes its id.
``encode_pieces`` is ours, for prompts that mix template markup with user text: added-token strings
in the user text stay ordinary text (SPEC §3.5 has every added token ``special``; the reference
has no such mode).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, pre_tokenizers

# model types that 5.23 forces onto the plain tokenizers backend, whatever tokenizer_class says
_VERBATIM_MODEL_TYPES = frozenset({"smolvlm"})
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and "content" in v:
        return str(v["content"])
    raise ValueError(f"tokenizer_config.json: cannot read special token {v!r}")


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (only used if the config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    out = list(ids)
    if out and isinstance(out[0], (list, tuple)):
        raise ValueError("decode() takes one sequence of ids; use batch_decode() for several")
    return [int(i) for i in out]


class Tokenizer:
    """Byte-level BPE tokenizer of a SmolVLM checkpoint (see module docstring for the reference)."""

    def __init__(self, backend: _HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        cfg = self.config
        self.bos_token: str | None = _content(cfg.get("bos_token"))
        self.eos_token: str | None = _content(cfg.get("eos_token"))
        self.unk_token: str | None = _content(cfg.get("unk_token"))
        self.pad_token: str | None = _content(cfg.get("pad_token"))
        self.additional_special_tokens: list[str] = [_content(t) or "" for t in cfg.get("additional_special_tokens", [])]
        self.padding_side: str = cfg.get("padding_side", "right")
        self.model_max_length: int | None = cfg.get("model_max_length")
        self.clean_up_tokenization_spaces: bool = bool(cfg.get("clean_up_tokenization_spaces", False))
        for name in (*_SPECIAL_ATTRS, "additional_special_tokens"):
            toks = getattr(self, name)
            for t in [toks] if isinstance(toks, str) else (toks or []):
                if self.backend.token_to_id(t) is None:
                    raise ValueError(f"tokenizer_config.json: {name} {t!r} is not in the vocabulary")
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self.added_tokens: dict[str, int] = added  # every added token string (special or not) -> id
        # leftmost-longest, as the tokenizers library matches added tokens
        self._added_re = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) or "(?!)")
        self._plain_backend: _HFTokenizer | None = None

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, pre_tokenizer: Literal["transformers", "file"] = "transformers"
    ) -> "Tokenizer":
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``config.json`` for the model type)."""
        d = Path(directory)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {d}")
        backend = _HFTokenizer.from_file(str(tj))
        cfg_path = d / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        model_type = ""
        if (d / "config.json").is_file():
            model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type", "")
        tok_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        if pre_tokenizer == "transformers" and tok_class == "GPT2Tokenizer" and model_type not in _VERBATIM_MODEL_TYPES:
            # 5.23 GPT2Tokenizer.__init__: ByteLevel pre-tokenizer/decoder replace the file's.
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
            backend.decoder = decoders.ByteLevel()
        elif pre_tokenizer not in ("transformers", "file"):
            raise ValueError(f"pre_tokenizer must be 'transformers' or 'file', got {pre_tokenizer!r}")
        return cls(backend, config)

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings in the text become their single ids; no BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_pieces(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        """``(text, plain)`` pieces -> ids: ``encode`` of the joined text, except that added-token
        strings inside ``plain`` pieces are ordinary text (byte-level BPE like any other text).

        Added tokens are found in the markup pieces only; the text between two of them, markup and
        plain alike, is one BPE run, exactly as ``encode`` splits the joined text (so with no
        added-token string in the plain pieces both give the same ids).
        """
        if not any(plain and self._added_re.search(text) for text, plain in pieces):
            return self.encode("".join(text for text, _ in pieces))
        ids: list[int] = []
        run: list[str] = []  # text since the last real added token
        for text, plain in pieces:
            if plain:
                run.append(text)
                continue
            pos = 0
            for m in self._added_re.finditer(text):
                run.append(text[pos:m.start()])
                ids += self._encode_plain("".join(run))
                ids.append(self.added_tokens[m.group()])
                run, pos = [], m.end()
            run.append(text[pos:])
        return ids + self._encode_plain("".join(run))

    def _encode_plain(self, text: str) -> list[int]:
        """BPE with special-token splitting off (``tokenizers``' ``encode_special_tokens``)."""
        if not text:
            return []
        if self._plain_backend is None:
            # a copy: the flag is tokenizer state, and ``backend`` must keep the reference behaviour
            self._plain_backend = _HFTokenizer.from_str(self.backend.to_str())
            self._plain_backend.encode_special_tokens = True
        return self._plain_backend.encode(text, add_special_tokens=False).ids

    # -- decoding --------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- vocabulary ------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def all_special_tokens(self) -> list[str]:
        """bos, eos, unk, pad, then the additional special tokens, de-duplicated (5.23 order)."""
        toks = [getattr(self, a) for a in _SPECIAL_ATTRS] + self.additional_special_tokens
        seen: dict[str, None] = {}
        for t in toks:
            if t is not None:
                seen.setdefault(t, None)
        return list(seen)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab={len(self)}, eos={self.eos_token!r}, pad={self.pad_token!r})"
