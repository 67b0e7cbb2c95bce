"""W&B environment: credentials, the server's reachability and the logging mode, decided in one place.

Standard library only (W&B itself is imported by the code that logs). Rules:
- explicit config (`logger.mode`) > `WANDB_MODE` > online iff credentials are present, else offline;
- credentials: `WANDB_API_KEY`, or a netrc entry for the server's host (`wandb login` writes one);
- online also needs the server: a TCP connection to it is tried first (`reachable`, 3 s), so a machine with a
  key but no network logs offline at once instead of waiting out W&B's own init timeout (measured: 60 s, then
  a crash with "run ID ... is in use" when falling back).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

OFF = ("offline", "disabled", "dryrun")


def server() -> tuple[str, int]:
    """(host, port) of the W&B server: WANDB_BASE_URL, else api.wandb.ai:443."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def has_credentials() -> bool:
    """An API key in the environment or a netrc login for the server's host (mode aside)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return bool(netrc.netrc(os.environ.get("NETRC")).authenticators(server()[0]))
    except (OSError, netrc.NetrcParseError):
        return False


def online_possible() -> bool:
    """Credentials present and WANDB_MODE not set to an offline mode: what `km sweep` online needs."""
    return os.environ.get("WANDB_MODE", "").lower() not in OFF and has_credentials()


def reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens within `timeout` seconds."""
    try:
        with socket.create_connection(server(), timeout=timeout):
            return True
    except OSError:
        return False


def mode(cfg_mode: str | None) -> str:
    """Explicit config > WANDB_MODE > online iff credentials are present, else offline."""
    if cfg_mode:
        return cfg_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_credentials() else "offline"
