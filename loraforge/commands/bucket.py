from __future__ import annotations

from loraforge.commands._pending import pending


def command() -> None:
    """Not available yet."""
    pending("bucket", "issue 3, dataset pipeline")
