"""Errors shown to people: one line each, so a failure reads as what to change, not as a traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class ConfigError(ValueError):
    """Bad user input: the CLI prints it as one line and exits 2 before anything runs."""


def one_line(error: BaseException, *, with_type: bool = False, first_line: bool = False) -> str:
    """An exception's message on one line (colour codes dropped): all of it squeezed, or its first line only.

    `with_type` prefixes `Type: `; an empty message gives the type's name.
    """
    text = ANSI_ESCAPE.sub("", str(error)).strip()
    text = " ".join((text.splitlines()[0] if first_line and text else text).split())
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type else text


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then its cause (or context), and so on, each once: where the real failure of a wrapped one is."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
