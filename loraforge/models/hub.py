"""Whether the Hugging Face hub can be reached, decided at once.

Without a network, ``huggingface_hub`` retries every request with back-off (about 25 seconds per
file) before it falls back to its cache or fails. loraforge asks once per process instead: a
name lookup and a TCP connection to the hub's endpoint, bounded by a short timeout. When that
fails (or ``HF_HUB_OFFLINE`` is set), hub files are looked up in the cache only.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_probed: dict[str, bool] = {}


def offline_by_environment() -> bool:
    """``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, else ``https://huggingface.co``)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # an old huggingface_hub without constants
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's endpoint accepts a connection (asked once per endpoint and process).

    The name lookup, which a socket timeout does not bound, runs in a thread that is given
    ``timeout`` seconds too.
    """
    if offline_by_environment():
        return False
    endpoint = hub_endpoint()
    if endpoint not in _probed:
        _probed[endpoint] = _connects(endpoint, timeout)
    return _probed[endpoint]


def _connects(endpoint: str, timeout: float) -> bool:
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="loraforge-hub-probe", daemon=True)
    thread.start()
    thread.join(2 * timeout)
    return bool(result) and result[0]
