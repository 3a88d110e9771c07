"""Graph-capture benchmark: ``python -m hybrid_ep_infer.bench --help``."""

import socket


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free just now: where spawned ranks meet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
