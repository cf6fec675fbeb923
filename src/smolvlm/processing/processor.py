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

Video (SPEC §4.1; 5.23 ``SmolVLMProcessor`` + ``SmolVLMVideoProcessor``, which cannot run without
torchvision): each ``<video>`` marker takes one video, sampled (``video.py``), its frames
preprocessed as unsplit ``M x M`` images from the checkpoint's ``size.longest_edge`` (5.23 uses
``size``, not ``video_sampling.video_size``; SPEC §4.1 hazard), and the marker replaced by the
5.23 ``replace_video_token`` text, whose frame-count word is the largest frame count of any video
in the call (5.23: ``pixel_values.shape[1]`` of the padded video batch). Differences, on purpose:

* Sampling always happens: ``fps`` / ``max_frames`` default to the checkpoint's
  ``video_sampling`` (what 5.23's ``apply_chat_template(tokenize=True)`` passes); 5.23's plain
  ``__call__`` decodes every frame unless ``do_sample_frames=True``. ``num_frames=N`` means exactly
  N evenly spaced frames (5.23's SmolVLM sampler reads ``num_frames`` as the ``max_frames`` cap).
  In-memory frames (lists, arrays) carry no frame rate: all are kept unless ``num_frames`` is given.
* ``pixel_values`` has one row per *prompt* (B, N, 3, M, M): the sample's image tiles and video
  frames concatenated in placeholder order, zero-padded to the longest sample. 5.23's video
  processor returns one row per *video*, and with images and videos in one call its video
  ``pixel_values`` overwrite the image ones (the model then fails on the token/feature count).
  For one video per prompt the two layouts are identical; otherwise the non-padding frames are
  the same tensors in the same order, which is all the model reads (padding arrays are dropped).
* Padding frames get ``pixel_attention_mask`` 0, as padding images do; 5.23's
  ``SmolVLMVideoProcessor.pad`` marks them 1. The model never reads it (all-zero arrays are dropped).
* A ``<video>`` marker without a video raises (as 5.23's SmolVLMProcessor; its Idefics3Processor
  would tokenize the marker as text).
* SmolVLM v1 checkpoints (``Idefics3Processor``, no ``video_sampling``) take videos too, with
  fps 1 / at most 64 frames and the SmolVLM2 layout (5.23's Idefics3Processor has no video
  support; its chat template silently drops video items, ours renders them as ``<video>``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from smolvlm.processing import chat
from smolvlm.processing.errors import PromptError
from smolvlm.processing.image import ImageInput, ImageLayout, ImageProcessor, TileBudget
from smolvlm.processing.prompt import ImageTokens, check_marker_counts, expand_prompt, image_prompt_string
from smolvlm.processing.tokenizer import Tokenizer

_HUB_PATTERNS = ["*.json", "*.txt", "*.jinja"]


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


def resolve_checkpoint_dir(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id fetched (config/tokenizer files only) with huggingface_hub."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo_id)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory not found: {s}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:  # not cached yet: try the network below
        pass
    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, network error
        raise FileNotFoundError(
            f"{s!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); are you offline?"
        ) from None


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


VIDEO_TOKEN = "<video>"  # text placeholder, not a vocabulary token (SPEC §3.5)


@dataclass(frozen=True)
class VideoSampling:
    """``preprocessor_config.json`` ``video_sampling`` (SmolVLM2): target frame rate and frame cap.

    ``video_size`` is ignored on purpose: 5.23 overwrites it with ``size`` (SPEC §4.1 hazard).
    Checkpoints without the block (SmolVLM v1) get the SmolVLM2 values, fps 1 and 64 frames.
    """

    fps: float = 1.0
    max_frames: int = 64
    from_checkpoint: bool = False

    @classmethod
    def from_dict(cls, d: Any) -> "VideoSampling":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"preprocessor_config.json: video_sampling must be an object, got {d!r}")
        fps, mx = d.get("fps", cls.fps), d.get("max_frames", cls.max_frames)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"preprocessor_config.json: video_sampling.fps must be a positive number, got {fps!r}")
        if isinstance(mx, bool) or not isinstance(mx, int) or mx < 1:
            raise ValueError(f"preprocessor_config.json: video_sampling.max_frames must be a positive integer, got {mx!r}")
        return cls(float(fps), mx, True)


def _is_frame(x: Any) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, np.ndarray) and x.ndim == 3)


def _is_video(x: Any) -> bool:
    """One video on its own: a path, preloaded frames, a (T, H, W, 3) array or a list of frames."""
    from smolvlm.processing.video import VideoFrames

    if isinstance(x, (str, Path, VideoFrames)) or (isinstance(x, np.ndarray) and x.ndim == 4):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_frame(f) for f in x)


def _pad_media(samples: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (3, h, w) arrays -> (B, N, 3, H, W) float32 + (B, N, H, W) int64 mask (SPEC §2.8)."""
    flat = [a for s in samples for a in s]
    n_max = max(len(s) for s in samples)
    h_max, w_max = max(a.shape[1] for a in flat), max(a.shape[2] for a in flat)
    pixel_values = np.zeros((len(samples), n_max, 3, h_max, w_max), dtype=np.float32)  # (B, N, 3, H, W)
    mask = np.zeros((len(samples), n_max, h_max, w_max), dtype=np.int64)  # (B, N, H, W)
    for i, sample in enumerate(samples):
        for j, a in enumerate(sample):
            pixel_values[i, j, :, : a.shape[1], : a.shape[2]] = a
            mask[i, j, : a.shape[1], : a.shape[2]] = 1
    return pixel_values, mask


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

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | Path, *, revision: str | None = None, allow_remote: bool = False
    ) -> "SmolVLMProcessor":
        """Load from a checkpoint directory (or hub repo id): tokenizer, preprocessor, template."""
        d = resolve_checkpoint_dir(path_or_repo_id, revision)
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
        return self.tokenizer.token_to_id("<end_of_utterance>")

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[chat.Message] | Sequence[Sequence[chat.Message]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        *,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> str | list[str] | list[int]:
        """Render the checkpoint's template; a list of conversations gives a list of strings.

        A conversation with a ``{"type": "video"}`` item is rendered with the SmolVLM2 default
        template (video items -> ``<video>``) unless ``chat_template`` is given, as 5.23
        ``SmolVLMProcessor`` does; we do it for SmolVLM v1 checkpoints too (module docstring).
        ``tokenize=True`` returns the ids of the full processed prompt (markers expanded, using the
        images and videos the messages carry, videos sampled with ``num_frames``/``fps``/
        ``max_frames``), like 5.23's ``tokenize=True`` ``input_ids``, as a plain list.
        """
        batched = bool(messages) and isinstance(messages[0], Sequence) and not isinstance(messages[0], (str, dict))
        convs = list(messages) if batched else [messages]
        specials = {a: getattr(self.tokenizer, a) for a in ("bos_token", "eos_token", "unk_token", "pad_token")}
        texts = []
        for conv in convs:
            template = chat_template or self.chat_template
            if chat_template is None and chat.has_video(conv):
                template = chat.DEFAULT_VIDEO_CHAT_TEMPLATE
            texts.append(chat.render_chat(template, conv, add_generation_prompt=add_generation_prompt,
                                          special_tokens=specials))
        if not tokenize:
            return texts if batched else texts[0]
        images = [self.collect_images(c) for c in convs]
        videos = [self.collect_videos(c) for c in convs]
        out = self(text=texts, images=images if any(images) else None, videos=videos if any(videos) else None,
                   return_tensors="np", num_frames=num_frames, fps=fps, max_frames=max_frames)
        ids = [row[m.astype(bool)].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
        return ids if batched else ids[0]  # type: ignore[return-value]

    @staticmethod
    def collect_images(messages: Sequence[chat.Message]) -> list[Any]:
        """Images referenced by ``{"type": "image", "image"|"url"|"path"|"base64": ...}`` items, in order."""
        return chat.collect_images(messages)

    @staticmethod
    def collect_videos(messages: Sequence[chat.Message]) -> list[Any]:
        """Videos referenced by ``{"type": "video", "video"|"url"|"path": ...}`` items, in order."""
        return chat.collect_videos(messages)

    # -- main call -----------------------------------------------------------------------------

    def _nest_images(self, images: Any, texts: list[str] | None) -> list[list[ImageInput]]:
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

    def _nest_videos(self, videos: Any, texts: list[str] | None) -> list[list[Any]]:
        """One video, a flat list (split over the prompts by ``<video>`` count), or one list per prompt.

        A video is a path, a ``VideoFrames``, a ``(T, H, W, 3)`` array or a list of frames (PIL
        images / ``(H, W, 3)`` arrays); inside a per-prompt list a list of image paths is one video too.
        """
        if _is_video(videos):
            return [[videos]]
        if not isinstance(videos, (list, tuple)):
            raise PromptError(f"videos must be a video, a list of videos or one list per prompt, got {type(videos).__name__}")
        videos = list(videos)
        if videos and all(isinstance(x, (list, tuple)) and not _is_video(x) for x in videos):
            return [list(x) for x in videos]
        bad = [i for i, x in enumerate(videos) if not _is_video(x)]
        if bad:
            raise PromptError(f"videos[{bad[0]}] is not a video (a path, VideoFrames, (T, H, W, 3) array or list of frames)")
        if texts is None or len(texts) == 1:
            return [videos]
        counts = [t.count(VIDEO_TOKEN) for t in texts]
        if sum(counts) != len(videos):
            raise PromptError(f"the prompts hold {sum(counts)} {VIDEO_TOKEN} marker(s) in total {counts} but "
                              f"{len(videos)} video(s) were given")
        starts = np.cumsum([0, *counts])
        return [videos[starts[i]:starts[i + 1]] for i in range(len(texts))]

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
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
    ) -> ProcessorOutput:
        """Prompts (with ``<image>`` / ``<video>`` markers) + images / videos -> input_ids, attention_mask,
        pixel_values, pixel_attention_mask. Video sampling arguments: see ``load_video``.
        ``no_upscale`` / ``max_tiles``: opt-in image tile budget (``image.TileBudget``; default off = reference)."""
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if text is None and images is None and videos is None:
            raise PromptError("give text, images, videos, or text with images/videos")
        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        if texts is not None and not all(isinstance(t, str) for t in texts):
            raise PromptError("text must be a string or a list of strings")
        nested = self._nest_images(images, texts) if images is not None else None
        if texts is not None:
            check_marker_counts(texts, [len(s) for s in nested] if nested else [0] * len(texts), self.image_tokens)

        out = ProcessorOutput()
        if videos is not None:
            vids = self._nest_videos(videos, texts)
            out.update(self._with_videos(texts, nested, vids, side, do_image_splitting,
                                         dict(num_frames=num_frames, fps=fps, max_frames=max_frames)))
        elif texts is not None:
            self._check_video_markers(texts, None)
            if nested and any(nested):
                batch = self.image_processor(nested, do_image_splitting, _budget(no_upscale, max_tiles))
                texts = [
                    expand_prompt(t, [self.image_string(lay) for lay in lays], self.image_tokens)
                    for t, lays in zip(texts, batch.layouts)
                ]
            else:
                batch = None
            out.update(self._pad(self.tokenizer.encode_batch(texts), side))
        else:
            batch = self.image_processor(nested, do_image_splitting, _budget(no_upscale, max_tiles))  # type: ignore[arg-type]
        if videos is None and batch is not None:
            out["pixel_values"] = batch.pixel_values
            out["pixel_attention_mask"] = batch.pixel_attention_mask
        if return_tensors == "pt":
            import torch

            for k, v in out.items():
                out[k] = torch.from_numpy(v)
        return out

    # -- video -----------------------------------------------------------------------------------

    def load_video(self, source: Any, *, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int | None = None) -> Any:
        """One video -> ``VideoFrames`` (sampled frames + timestamps), ``video.load_video`` policy.

        Files: SmolVLM2 sampling (``fps`` frames per second, at most ``max_frames``; both default
        to the checkpoint's ``video_sampling``), or exactly ``num_frames`` evenly spaced frames.
        Frame lists / arrays: all frames, or ``num_frames`` of them (no frame rate to sample by).
        A ``VideoFrames`` is already sampled and is returned as is.
        """
        from smolvlm.processing.video import VideoError, VideoFrames, load_video

        if isinstance(source, VideoFrames):
            if len(source.frames) == 0 or len(source.timestamps) != len(source.frames):
                raise VideoError(f"VideoFrames holds {len(source.frames)} frames and {len(source.timestamps)} "
                                 "timestamps; need one timestamp per frame and at least one frame")
            return source
        if isinstance(source, (str, Path)) and num_frames is None:
            fps = self.video_sampling.fps if fps is None else fps
            max_frames = self.video_sampling.max_frames if max_frames is None else max_frames
        return load_video(source, fps=fps, max_frames=max_frames, num_frames=num_frames)

    def video_pixels(self, frames: Any) -> np.ndarray:
        """``VideoFrames`` -> ``(T, 3, M, M)`` float32: unsplit frames resized from ``size.longest_edge``."""
        from smolvlm.processing.video import preprocess_frames

        c = self.image_processor.config
        return preprocess_frames(frames.frames, longest_edge=c.longest_edge, tile_size=c.max_image_size,
                                 mean=c.image_mean, std=c.image_std, rescale_factor=c.rescale_factor)

    def video_string(self, frames: Any, num_frames_word: int) -> str:
        """Text that replaces one ``<video>`` (5.23 ``SmolVLMProcessor.replace_video_token``)."""
        from smolvlm.processing.video import FAKE_TOKEN, GLOBAL_IMG_TOKEN, IMAGE_TOKEN, video_prompt

        text = video_prompt(num_frames_word, list(frames.timestamps), frames.duration, self.image_seq_len)
        t = self.image_tokens
        if (t.image, t.fake, t.global_img) != (IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_IMG_TOKEN):
            # a tokenizer_config that renames the image tokens (5.23 reads them from the tokenizer)
            block = FAKE_TOKEN + GLOBAL_IMG_TOKEN + IMAGE_TOKEN * self.image_seq_len + FAKE_TOKEN
            text = text.replace(block, image_prompt_string(0, 0, self.image_seq_len, t))
        return text

    def _check_video_markers(self, texts: list[str], videos: list[list[Any]] | None) -> None:
        counts = [len(v) for v in videos] if videos is not None else [0] * len(texts)
        if len(counts) != len(texts):
            raise PromptError(f"got {len(texts)} prompt(s) but videos for {len(counts)} prompt(s); "
                              "pass one list of videos per prompt")
        for i, (t, n) in enumerate(zip(texts, counts)):
            if t.count(VIDEO_TOKEN) != n:
                shown = t if len(t) <= 80 else t[:77] + "..."
                raise PromptError(f"prompt {i} has {t.count(VIDEO_TOKEN)} {VIDEO_TOKEN} marker(s) but {n} video(s) "
                                  f"were given for it (prompt {i}: {shown!r})")

    def _with_videos(self, texts: list[str] | None, images: list[list[Any]] | None, videos: list[list[Any]],
                     side: str, do_image_splitting: bool | None, sampling: dict[str, Any]) -> dict[str, np.ndarray]:
        """Prompts with ``<video>`` (and maybe ``<image>``) markers -> ids + one media row per prompt."""
        from smolvlm.processing.video import pad_videos

        if texts is not None:
            self._check_video_markers(texts, videos)
        loaded = [[self.load_video(v, **sampling) for v in sample] for sample in videos]
        pixels = [[self.video_pixels(f) for f in sample] for sample in loaded]
        flat = [p for sample in pixels for p in sample]
        if not flat:
            raise PromptError("no videos in the batch")
        if texts is None:
            if images is not None:
                raise PromptError("images and videos together need text with <image>/<video> markers to order them")
            pv, mask = pad_videos(flat)  # (V, T_max, 3, M, M): one row per video, as 5.23's video processor
            return {"pixel_values": pv, "pixel_attention_mask": mask}
        word = max(p.shape[0] for p in flat)  # 5.23: pixel_values.shape[1] of the padded video batch
        pattern = re.compile(f"{re.escape(self.image_tokens.image)}|{re.escape(VIDEO_TOKEN)}")
        expanded, media = [], []
        for i, t in enumerate(texts):
            imgs = iter(images[i] if images else [])
            vids = iter(zip(loaded[i], pixels[i]))
            arrays: list[np.ndarray] = []

            def replace(m: re.Match) -> str:
                if m.group() == VIDEO_TOKEN:
                    frames, px = next(vids)
                    arrays.extend(px)  # (3, M, M) each
                    return self.video_string(frames, word)
                parts, lay = self.image_processor.split(next(imgs), do_image_splitting)
                arrays.extend(self.image_processor.normalize(p) for p in parts)
                return self.image_string(lay)

            expanded.append(pattern.sub(replace, t))  # one left-to-right pass, like 5.23
            media.append(arrays)
        if not any(media):  # cannot happen (markers were checked), kept for a clear message
            raise PromptError("no image or video arrays were produced")
        out = self._pad(self.tokenizer.encode_batch(expanded), side)
        out["pixel_values"], out["pixel_attention_mask"] = _pad_media(media)
        return out

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
