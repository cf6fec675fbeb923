"""Token ids -> text: incremental detokenization and stop strings (the one stop-string implementation).

Reference behaviour: the final text equals ``tokenizer.decode(new_ids, skip_special_tokens=True)``
(SPEC 3.6) cut before the first stop string. Pieces are safe to print as they come: a piece
never ends inside a multi-byte character (byte-level BPE tokens can split one), and text that
could still become a stop string is held back until it can no longer match.

``StopStringFilter`` finds stop strings; ``TextStream`` (``smolvlm.stream``), ``RowStops``
(batched ``generate_ids``) and ``apply_stop_strings`` (whole texts) all use it.
"""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals ``decode(all ids)``.

    Decodes a short window ``ids[prefix:]`` and subtracts the already-emitted window text
    ``ids[prefix:read]`` (the scheme of text-generation-inference), so each step costs O(window),
    and decoders that treat the first token specially still give consistent deltas. While the
    decoded tail ends in U+FFFD the bytes of a character are incomplete: hold everything back.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids[:read] are already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete or invalid byte sequence at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing printable yet (special token skipped, or a partial character)
        self._prefix, self._read = self._read, len(self.ids)
        return new_text[len(prefix_text) :]


class StopStringFilter:
    """Passes text through until a stop string appears; never emits any part of a stop string.

    ``push(text) -> (safe_text, stopped)``. Text that ends with a prefix of some stop string is
    held back until more text decides it; on a match, everything from the earliest match start
    on is dropped and ``stopped`` is True.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.stop_strings = tuple(stop_strings)
        self._buf = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._buf + text
        hits = [i for i in (buf.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self._buf, self.stopped = "", True
            return buf[: min(hits)], True
        hold = self._partial_suffix_len(buf)
        self._buf = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """End of generation: held text was not a stop string after all."""
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """Detokenizer + stop-string filter for one sequence: ``push(id) -> (text, stopped)``."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = StopStringFilter(stop_strings)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self.stop.push(self.detok.push(token_id))

    def flush(self) -> str:
        text, stopped = self.stop.push(self.detok.flush())
        return text if stopped else text + self.stop.flush()


def apply_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Whole-text version of the filter: ``text`` cut before the earliest stop string."""
    f = StopStringFilter(stop_strings)
    out, stopped = f.push(text)
    return out if stopped else out + f.flush()


class RowStops:
    """Stop strings for a batch of rows generated together (``generate_tokens``), one ``TextStream``
    per row. A row stops on the token that completes a stop string, and that token is kept, as
    transformers' ``StopStringCriteria`` does (callers that want text cut it with ``TextStream``)."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], batch_size: int) -> None:
        self.rows = [TextStream(tokenizer, stop_strings) for _ in range(batch_size)]

    def update(self, tokens: Sequence[int], finished: Sequence[bool]) -> list[int]:
        """Feed each unfinished row its new token; the rows whose text now holds a stop string."""
        return [i for i, (t, done) in enumerate(zip(tokens, finished)) if not done and self.rows[i].push(t)[1]]


class AnswerText:
    """Text pieces -> answer pieces: whitespace before the first visible character is dropped (the
    model's first token usually carries a space after "Assistant:"). The one rule the CLI and the
    server share, so streamed, ``--json`` and HTTP answers are the same text."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece
