"""The one place output goes: tables and JSON to stdout, logs, warnings and hints to stderr."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
# soft_wrap: messages carry paths, which must survive copy-and-paste unbroken.
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout, unstyled, so pipes and ``jq`` get exactly the document."""
    out.file.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    out.file.flush()


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}")


def info(message: str) -> None:
    err.print(message)
