"""vLLM integration of hybrid_ep_infer (fused-MoE prepare/finalize backend).

Installed with the main package under its own import name. Importing this package
does not import vLLM; ``hybrid_ep_infer_vllm.prepare_finalize`` does (vLLM 0.32/0.33):

    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

``hybrid_ep_infer_vllm.plugin.register`` is the ``vllm.general_plugins`` entry point that
swaps it into a running vLLM (inert unless ``HYBRID_EP_INFER_VLLM=1``).
"""
