"""vLLM integration of hybrid_ep_infer (fused-MoE prepare/finalize backend).

Installed with the main package under its own import name. The adapter itself
is not implemented yet; importing this package only checks that it is installed.
"""
