"""Reaching a cluster's services: a Ray head (`--ray-address`) and an MLflow server (`--tracking-uri http://...`).

Both are checked before anything starts, because the libraries wait rather than fail: `ray.init` on an
address where nothing listens waits more than five minutes, and the MLflow client retries a dead server for
minutes. A TCP connect answers at once. Nothing here imports Ray: `use_ray_token_auth` must run before Ray
is imported.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 5.0


def use_ray_token_auth(address: Optional[str]) -> None:
    """Token mode for a driver that connects to an existing cluster, when a token is at hand and the user
    chose no mode. Ray >= 2.59 starts a cluster on this machine (`ray start --head`) with token authentication
    on, and a driver must be in token mode before Ray is imported or it cannot connect ("Failed to connect to
    Ray cluster"); a driver in token mode also connects to a cluster without authentication. Once Ray is
    imported (main() called in a process that uses Ray already) the mode is left alone: setting it then would
    not reach this process's Ray, only the processes it starts later, and a local cluster started then would
    want a token this process does not send."""
    if not address or address == "local" or "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _connect(host: str, port: int) -> Optional[str]:
    """None when something accepts a TCP connection at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


def ray_address_problem(address: Optional[str]) -> Optional[str]:
    """Why `address` (host:port of a Ray head's GCS, or ray://host:port of its client server) cannot be
    reached; None when it can, or when Ray resolves it itself (None, 'auto', 'local')."""
    if not address or address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or port is None:
        return f"--ray-address {address}: expected HOST:PORT (a Ray head, e.g. head:6379) or ray://HOST:PORT"
    why = _connect(host, port)
    if why is None:
        return None
    return (f"no Ray cluster answers at {address} ({why}): start one there (`ray start --head --port {port}`) "
            f"or fix --ray-address")


def tracking_uri_problem(uri: str) -> Optional[str]:
    """Why an http(s) MLflow tracking URI cannot be reached; None when it can, and for other stores (a SQLite
    file is created when missing)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"tracking URI {uri}: the port is not a number"
    why = _connect(parts.hostname or "", port)
    if why is None:
        return None
    return (f"no MLflow server answers at {uri} ({why}): start it (`mlflow server --host 0.0.0.0 --port {port}`) "
            f"or fix --tracking-uri")
