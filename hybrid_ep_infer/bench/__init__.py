"""Graph-capture benchmark: ``python -m hybrid_ep_infer.bench --help``."""
