"""SmolVLMProcessor: chat messages / prompts + images -> model inputs (SPEC §2, §3).

Mirrors transformers 5.23 ``Idefics3Processor`` (SmolVLM v1 checkpoints) and ``SmolVLMProcessor``
(SmolVLM2) with the PIL image backend: ``__call__`` expands every ``<image>`` marker into its
tile layout (``prompt.py``), tokenizes (``tokenizer.py``), and returns ``input_ids``,
``attention_mask`` and, with images, ``pixel_values`` / ``pixel_attention_mask`` (``image.py``)
with the reference's shapes and dtypes. Differences from the reference, on purpose:

* ``__call__`` always pads ids to the longest prompt (5.23 needs ``padding=True`` for that);
  ``padding_side`` defaults to the tokenizer's ("right"); pass "left" for batched generation.
* ``apply_chat_template`` defaults to ``add_generation_prompt=True`` and rejects string content
  (see ``chat.py``).
* Chat paths (``chat_inputs``, ``apply_chat_template(tokenize=True)``) tokenize the text of text
  items as plain text: a ``<end_of_utterance>``, ``<image>``, ``<video>`` or any other added-token
  string a user types stays ordinary text, so user text cannot fake turns or images (5.23 turns
  them into control tokens). Only the template's own markup yields special tokens and markers.
  ``allow_special_tokens=True`` restores the reference behaviour. ``__call__(text=...)`` takes an
  already-rendered prompt string and reads it exactly as 5.23 does.

Videos (``<video>`` markers, ``videos=``; SPEC §4.1, 5.23 ``SmolVLMProcessor``): sampling settings,
video nesting and placeholder expansion live in ``video_inputs.py``, whose docstring lists the
differences from the reference; the video methods here delegate to it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from smolvlm import hub
from smolvlm.processing import chat, video_inputs
from smolvlm.processing.errors import PromptError
from smolvlm.processing.image import ImageInput, ImageLayout, ImageProcessor, TileBudget
from smolvlm.processing.messages import (
    Message,
    as_messages,
    collect_images,
    collect_videos,
    has_video,
    text_items,
    validate_messages,
)
from smolvlm.processing.prompt import (
    END_OF_UTTERANCE_TOKEN,
    VIDEO_TOKEN,
    ImageTokens,
    Prompt,
    check_marker_counts,
    expand_prompt,
    image_prompt_string,
)
from smolvlm.processing.tokenizer import Tokenizer
from smolvlm.processing.video_inputs import VideoSampling


class ProcessorOutput(dict):
    """dict of model inputs; also ``out.input_ids`` and ``out.to(device)`` (BatchFeature-like)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any = None, dtype: Any = None) -> "ProcessorOutput":
        """Move tensors to ``device``; ``dtype`` applies to floating tensors only (pixel_values)."""
        out = ProcessorOutput()
        for k, v in self.items():
            if hasattr(v, "to"):
                v = v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)
            out[k] = v
        return out


def processor_files_dir(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id fetched (config/tokenizer files only) with huggingface_hub."""
    return hub.resolve_checkpoint_dir(path_or_repo_id, revision, allow_patterns=hub.PROCESSOR_PATTERNS)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _image_seq_len(d: Path) -> int:
    """processor_config.json ``image_seq_len``; else derived from config.json (SPEC §3.2)."""
    pc = _read_json(d / "processor_config.json")
    if "image_seq_len" in pc:
        return int(pc["image_seq_len"])
    cfg = _read_json(d / "config.json")
    v = cfg.get("vision_config", {})
    if "image_size" in v and "patch_size" in v and "scale_factor" in cfg:
        return int((v["image_size"] // v["patch_size"]) ** 2 // cfg["scale_factor"] ** 2)
    raise FileNotFoundError(f"image_seq_len not found: no processor_config.json (or usable config.json) in {d}")


def _budget(no_upscale: bool, max_tiles: int | None) -> TileBudget | None:
    """The opt-in tile policy, or None (reference behaviour) when neither option is set."""
    return TileBudget(no_upscale, max_tiles) if no_upscale or max_tiles is not None else None


def _is_image(x: Any) -> bool:
    return isinstance(x, (str, Path, bytes, bytearray, Image.Image, np.ndarray))


class SmolVLMProcessor:
    """Tokenizer + image processor + chat template of one checkpoint (transformers 5.23 semantics)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        image_seq_len: int,
        chat_template: str,
        *,
        processor_class: str = "Idefics3Processor",
        image_tokens: ImageTokens = ImageTokens(),
        video_sampling: VideoSampling = VideoSampling(),
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = int(image_seq_len)
        self.chat_template = chat_template
        self.processor_class = processor_class
        self.image_tokens = image_tokens
        self.video_sampling = video_sampling
        for t in (image_tokens.image, image_tokens.fake):
            if tokenizer.token_to_id(t) is None:
                raise ValueError(f"tokenizer has no {t!r} token; not a SmolVLM tokenizer")
        self._image_token_counts = lru_cache(maxsize=256)(self._count_image_tokens)
        # strings that text items may not carry as markup: added tokens and the processor's markers
        reserved = {*tokenizer.added_tokens, image_tokens.image, VIDEO_TOKEN}
        self._reserved = re.compile("|".join(re.escape(t) for t in sorted(reserved, key=len, reverse=True)))

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | Path, *, revision: str | None = None, allow_remote: bool = False
    ) -> "SmolVLMProcessor":
        """Load from a checkpoint directory (or hub repo id): tokenizer, preprocessor, template."""
        d = processor_files_dir(path_or_repo_id, revision)
        tokenizer = Tokenizer.from_pretrained(d)
        pc = _read_json(d / "processor_config.json")
        processor_class = pc.get("processor_class") or _read_json(d / "preprocessor_config.json").get(
            "processor_class", "Idefics3Processor")
        tokens = ImageTokens()
        if processor_class == "SmolVLMProcessor":
            # 5.23 SmolVLMProcessor reads these tokenizer attributes when a tokenizer_config defines them.
            tc = tokenizer.config
            tokens = ImageTokens(tc.get("image_token", tokens.image), tc.get("fake_image_token", tokens.fake),
                                 tc.get("global_image_token", tokens.global_img))
        image_processor = ImageProcessor.from_pretrained(d, allow_remote=allow_remote)
        return cls(
            tokenizer,
            image_processor,
            _image_seq_len(d),
            chat.load_chat_template(d),
            processor_class=processor_class,
            image_tokens=tokens,
            video_sampling=VideoSampling.from_dict(image_processor.config.extra.get("video_sampling")),
        )

    def __repr__(self) -> str:
        return f"SmolVLMProcessor({self.processor_class}, S={self.image_seq_len}, {self.image_processor!r})"

    # -- ids -----------------------------------------------------------------------------------

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.image_tokens.image)  # type: ignore[return-value]

    @property
    def fake_image_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.image_tokens.fake)  # type: ignore[return-value]

    @property
    def end_of_utterance_token_id(self) -> int | None:
        return self.tokenizer.token_to_id(END_OF_UTTERANCE_TOKEN)

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        *,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        allow_special_tokens: bool = False,
    ) -> str | list[str] | list[int]:
        """Render the checkpoint's template; a list of conversations gives a list of strings.

        A conversation with a ``{"type": "video"}`` item is rendered with the SmolVLM2 default
        template (video items -> ``<video>``) unless ``chat_template`` is given, as 5.23
        ``SmolVLMProcessor`` does; we do it for SmolVLM v1 checkpoints too (module docstring).
        ``tokenize=True`` returns the ids of the full processed prompt (markers expanded, using the
        images and videos the messages carry, videos sampled with ``num_frames``/``fps``/
        ``max_frames``), like 5.23's ``tokenize=True`` ``input_ids``, as a plain list; the text
        items are plain text unless ``allow_special_tokens`` (module docstring).
        """
        batched = bool(messages) and isinstance(messages[0], Sequence) and not isinstance(messages[0], (str, dict))
        convs = list(messages) if batched else [messages]
        if not tokenize:
            texts = [chat.render_chat(self._template_for(c, chat_template), c,
                                      add_generation_prompt=add_generation_prompt,
                                      special_tokens=self._special_tokens()) for c in convs]
            return texts if batched else texts[0]
        prompts = [self.render_prompt(c, add_generation_prompt, chat_template,
                                      allow_special_tokens=allow_special_tokens) for c in convs]
        images = [collect_images(c) for c in convs]
        videos = [collect_videos(c) for c in convs]
        out = self(text=prompts, images=images if any(images) else None, videos=videos if any(videos) else None,
                   return_tensors="np", num_frames=num_frames, fps=fps, max_frames=max_frames)
        ids = [row[m.astype(bool)].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
        return ids if batched else ids[0]  # type: ignore[return-value]

    def render_prompt(
        self,
        conversation: Sequence[Message],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        *,
        allow_special_tokens: bool = False,
    ) -> Prompt:
        """One conversation -> ``Prompt``: the template's output is markup; the text items are plain
        text (special-token and marker strings in them stay text) unless ``allow_special_tokens``."""
        validate_messages(conversation)
        template = self._template_for(conversation, chat_template)
        kw = dict(add_generation_prompt=add_generation_prompt, special_tokens=self._special_tokens())
        if allow_special_tokens or not any(self._reserved.search(t) for t in text_items(conversation)):
            return Prompt.of(chat.render_chat(template, conversation, **kw))  # nothing to protect: as 5.23
        return Prompt(tuple(chat.render_pieces(template, conversation, **kw)))

    def chat_inputs(
        self,
        messages_or_prompt: str | Sequence[Message],
        images: Sequence[ImageInput] | None = None,
        *,
        allow_special_tokens: bool = False,
        add_generation_prompt: bool = True,
        return_tensors: Literal["pt", "np"] = "pt",
        **kwargs: Any,
    ) -> "ProcessorOutput":
        """A chat, or a prompt string with images -> model inputs for that one conversation.

        ``messages_or_prompt``: a chat (``{"role", "content"}`` dicts; string content is one text
        item; images and videos inside the items, ``{"type": "image", "image"|"path"|"url"|"base64": ...}``,
        ``{"type": "video", "video"|"path": ...}``), or a string: one user turn, ``images`` first, then
        the text. Text is plain text unless ``allow_special_tokens`` (module docstring). ``kwargs``:
        those of ``__call__`` (video sampling, ``do_image_splitting``, tile budget, ``padding_side``).
        Returns ``input_ids``, ``attention_mask`` and, with media, ``pixel_values`` / ``pixel_attention_mask``.
        """
        conv = as_messages(messages_or_prompt, images)
        imgs = collect_images(conv, required=True)
        vids = collect_videos(conv, required=True)
        prompt = self.render_prompt(conv, add_generation_prompt, allow_special_tokens=allow_special_tokens)
        return self(text=[prompt], images=[imgs] if imgs else None, videos=[vids] if vids else None,
                    return_tensors=return_tensors, **kwargs)

    def _template_for(self, conversation: Sequence[Message], chat_template: str | None) -> str:
        if chat_template is None and has_video(conversation):
            return chat.DEFAULT_VIDEO_CHAT_TEMPLATE
        return chat_template or self.chat_template

    def _special_tokens(self) -> dict[str, str | None]:
        return {a: getattr(self.tokenizer, a) for a in ("bos_token", "eos_token", "unk_token", "pad_token")}

    @staticmethod
    def collect_images(conversation: Sequence[Message]) -> list[Any]:
        """Images referenced by ``{"type": "image", "image"|"url"|"path"|"base64": ...}`` items, in order."""
        return collect_images(conversation)

    @staticmethod
    def collect_videos(conversation: Sequence[Message]) -> list[Any]:
        """Videos referenced by ``{"type": "video", "video"|"url"|"path": ...}`` items, in order."""
        return collect_videos(conversation)

    # -- main call -----------------------------------------------------------------------------

    def _nest_images(self, images: Any, texts: list[Prompt] | None) -> list[list[ImageInput]]:
        """Accept one image, a flat list, or one list per prompt (5.23 prepare_inputs_layout)."""
        if _is_image(images):
            return [[images]]
        images = list(images)
        if images and all(isinstance(x, (list, tuple)) for x in images):
            return [list(x) for x in images]
        if not all(_is_image(x) for x in images):
            raise PromptError("images must be an image, a list of images, or one list of images per prompt")
        if texts is None or len(texts) == 1:
            return [images]
        counts = [t.count(self.image_tokens.image) for t in texts]
        if sum(counts) != len(images):
            raise PromptError(
                f"the prompts hold {sum(counts)} {self.image_tokens.image} marker(s) in total {counts} but "
                f"{len(images)} image(s) were given"
            )
        starts = np.cumsum([0, *counts])
        return [images[starts[i]:starts[i + 1]] for i in range(len(texts))]

    def __call__(
        self,
        text: str | Prompt | Sequence[str | Prompt] | None = None,
        images: Any = None,
        return_tensors: Literal["pt", "np"] = "pt",
        padding_side: Literal["left", "right"] | None = None,
        do_image_splitting: bool | None = None,
        videos: Any = None,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        no_upscale: bool = False,
        max_tiles: int | None = None,
        pixel_dtype: Any = None,
    ) -> ProcessorOutput:
        """Prompts (with ``<image>`` / ``<video>`` markers) + images / videos -> input_ids, attention_mask,
        pixel_values, pixel_attention_mask. A prompt string is read as 5.23 reads it (every marker and
        special-token string counts); a ``Prompt`` (``render_prompt``) keeps its plain text literal.
        Video sampling arguments: see ``load_video``. ``no_upscale`` / ``max_tiles``: opt-in image
        tile budget (``image.TileBudget``; default off = reference). ``pixel_dtype``: a torch floating
        dtype for ``pixel_values``, with a bool ``pixel_attention_mask`` (the model's dtype: what the model
        reads, without the float32 batch; ``image.pad_arrays``); default float32 + int64 as the reference."""
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if pixel_dtype is not None and not getattr(pixel_dtype, "is_floating_point", False):
            raise ValueError(f"pixel_dtype must be a torch floating dtype (torch.bfloat16, ...), got {pixel_dtype!r}")
        if pixel_dtype is not None and return_tensors != "pt":
            raise ValueError("pixel_dtype needs return_tensors='pt' (numpy has no bfloat16)")
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if text is None and images is None and videos is None:
            raise PromptError("give text, images, videos, or text with images/videos")
        raw = [text] if isinstance(text, (str, Prompt)) else (list(text) if text is not None else None)
        if raw is not None and not all(isinstance(t, (str, Prompt)) for t in raw):
            raise PromptError("text must be a string or a list of strings")
        prompts = [Prompt.of(t) for t in raw] if raw is not None else None
        nested = self._nest_images(images, prompts) if images is not None else None
        if prompts is not None:
            check_marker_counts(prompts, [len(s) for s in nested] if nested else [0] * len(prompts), self.image_tokens)
        budget = _budget(no_upscale, max_tiles)

        out = ProcessorOutput()
        batch = None
        if videos is not None:
            expanded, media = video_inputs.expand_videos(
                prompts, nested, video_inputs.nest_videos(videos, prompts), image_processor=self.image_processor,
                image_seq_len=self.image_seq_len, tokens=self.image_tokens, sampling=self.video_sampling,
                do_image_splitting=do_image_splitting, budget=budget,
                load=dict(num_frames=num_frames, fps=fps, max_frames=max_frames), pixel_dtype=pixel_dtype)
            if expanded is not None:
                out.update(self._pad(self._encode(expanded), side))
            out.update(media)
        elif prompts is not None:
            video_inputs.check_video_markers(prompts, None)
            if nested and any(nested):
                batch = self.image_processor(nested, do_image_splitting, budget, pixel_dtype)
                prompts = [expand_prompt(p, [self.image_string(lay) for lay in lays], self.image_tokens)
                           for p, lays in zip(prompts, batch.layouts)]
            out.update(self._pad(self._encode(prompts), side))
        else:
            batch = self.image_processor(nested, do_image_splitting, budget, pixel_dtype)  # type: ignore[arg-type]
        if batch is not None:
            out["pixel_values"] = batch.pixel_values
            out["pixel_attention_mask"] = batch.pixel_attention_mask
        if return_tensors == "pt":
            import torch

            for k, v in out.items():
                out[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
        return out

    def _encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        if not any(p.has_plain for p in prompts):
            return self.tokenizer.encode_batch([str(p) for p in prompts])  # the reference's tokenization
        return [self.tokenizer.encode_pieces(p.pieces) for p in prompts]

    # -- video -----------------------------------------------------------------------------------

    def load_video(self, source: Any, *, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int | None = None) -> Any:
        """One video -> ``VideoFrames`` (sampled frames + timestamps), ``video.load_video`` policy.

        Files: SmolVLM2 sampling (``fps`` frames per second, at most ``max_frames``; both default
        to the checkpoint's ``video_sampling``), or exactly ``num_frames`` evenly spaced frames.
        Frame lists / arrays: all frames, or ``num_frames`` of them (no frame rate to sample by).
        A ``VideoFrames`` is already sampled and is returned as is.
        """
        return video_inputs.load_video_input(source, self.video_sampling, num_frames=num_frames, fps=fps,
                                             max_frames=max_frames)

    def _pad(self, ids: list[list[int]], side: str) -> dict[str, np.ndarray]:
        pad_id = self.tokenizer.pad_token_id
        length = max(len(x) for x in ids)
        if pad_id is None and any(len(x) != length for x in ids):
            raise ValueError("tokenizer has no pad token; cannot batch prompts of different lengths")
        input_ids = np.full((len(ids), length), pad_id if pad_id is not None else 0, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(ids), length), dtype=np.int64)  # (B, T)
        for i, x in enumerate(ids):
            sl = slice(length - len(x), length) if side == "left" else slice(0, len(x))
            input_ids[i, sl] = x
            mask[i, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def image_string(self, layout: ImageLayout) -> str:
        """Prompt text that replaces one ``<image>`` marker for an image with this layout."""
        return image_prompt_string(layout.rows, layout.cols, self.image_seq_len, self.image_tokens)

    def _count_image_tokens(self, rows: int, cols: int) -> int:
        # Tokenized in isolation: the block starts and ends with special tokens, so BPE never
        # merges across its edges and the count equals the in-context count.
        return len(self.tokenizer.encode(image_prompt_string(rows, cols, self.image_seq_len, self.image_tokens)))

    # -- decoding / counting ---------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def count_tokens(
        self, text: str | None = None, images: Sequence[ImageInput] | None = None,
        do_image_splitting: bool | None = None, no_upscale: bool = False, max_tiles: int | None = None,
    ) -> dict[str, Any]:
        """Token budget of one prompt without building pixel tensors (tile budget options as ``__call__``).

        ``text`` defaults to one ``<image>`` marker per image. Returns ``{"images": [{"width",
        "height", "resized", "grid", "rows", "cols", "tiles", "tokens"}, ...], "image_tokens",
        "text_tokens", "total_tokens"}`` (sizes as (height, width); ``tiles`` counts the arrays the
        image adds to ``pixel_values``, global image included).
        """
        images = list(images or [])
        text = self.image_tokens.image * len(images) if text is None else text
        check_marker_counts([text], [len(images)], self.image_tokens)
        per_image, reps = [], []
        for img in images:
            lay = self.image_processor.layout(img, do_image_splitting, _budget(no_upscale, max_tiles))
            n = self._image_token_counts(lay.rows, lay.cols)
            per_image.append({
                "width": lay.size[1], "height": lay.size[0], "resized": list(lay.resized), "grid": list(lay.grid),
                "rows": lay.rows, "cols": lay.cols, "tiles": lay.num_arrays, "tokens": n,
            })
            reps.append(self.image_string(lay))
        total = len(self.tokenizer.encode(expand_prompt(text, reps, self.image_tokens)))
        image_tokens = sum(x["tokens"] for x in per_image)
        return {"images": per_image, "image_tokens": image_tokens, "text_tokens": total - image_tokens,
                "total_tokens": total}
