"""Entry point of ``python -m hybrid_ep_infer.bench`` (the workers live in cli.py, which
spawned processes can import)."""

from .cli import main

main()
