from __future__ import annotations

from loraforge.commands._pending import pending


def command() -> None:
    """Not available yet."""
    pending("train", "issue 5, training")
