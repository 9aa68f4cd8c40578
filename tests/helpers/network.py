"""Whether a host answers: tests that check the offline behaviour run only where the download really fails."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def reachable(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the URL's host and port (443 for https, 80 for http) opens in time."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def any_reachable(*urls: str) -> bool:
    return any(reachable(url) for url in urls)
