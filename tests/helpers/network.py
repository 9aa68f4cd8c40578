"""Make the internet unreachable for one test, for real: every HTTP(S) request through urllib (torch.hub,
torchvision's downloads) goes to a proxy on a closed local port and is refused at once."""

from __future__ import annotations

import socket
import urllib.request

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def offline(monkeypatch) -> None:
    """Route every proxied request of this test to a closed local port, whatever this machine can reach."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    # urlopen keeps the first opener it builds, with the proxies of that moment: install one that uses ours
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    monkeypatch.setattr(urllib.request, "_opener", opener)
