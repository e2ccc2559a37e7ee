"""Marks a subcommand whose capability has not landed yet: it says so and exits non-zero."""

from __future__ import annotations

from loraforge.errors import LoraforgeError


class NotAvailableYet(LoraforgeError):
    exit_code = 3


def pending(name: str, issue: str) -> None:
    raise NotAvailableYet(
        f"`loraforge {name}` is not available in this version yet ({issue}).",
        hint="see the README's subcommand table for what works today",
    )
