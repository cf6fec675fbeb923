"""Errors raised by the processing package (bad images, bad prompts, bad messages).

All are ``ValueError`` subclasses so that callers (CLI, server) can catch one family and print
the message; each message names the offending input and what was expected.
"""

from __future__ import annotations


class ImageError(ValueError):
    """An image could not be used: unreadable, corrupt, truncated, empty, oversized, bad array."""


class PromptError(ValueError):
    """Text and images do not fit together (e.g. ``<image>`` markers vs images given)."""


class ChatError(ValueError):
    """A chat message list is malformed (e.g. string content, missing role)."""
