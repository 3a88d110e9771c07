"""The construction-time tuner's CPU-checkable parts: its candidates and its synthetic
workload. (It runs on GPUs only; tests/test_cuda_combine.py checks that it picks the same
candidate on every rank and that results do not depend on the tuning.)"""

import pytest
import torch

from hybrid_ep_infer import tuning
from hybrid_ep_infer.config import BufferConfig


def test_candidates_are_valid_and_include_the_defaults():
    for candidates, fields, default in ((tuning.DISPATCH_CANDIDATES, tuning.DISPATCH_FIELDS, (4, 1, 0, 0)),
                                        (tuning.COMBINE_CANDIDATES, tuning.COMBINE_FIELDS, (13, 1))):
        assert default in candidates
        assert len(set(candidates)) == len(candidates)
        for candidate in candidates:
            assert len(candidate) == len(fields)
            warps, chunk, *tma = candidate
            assert 1 <= warps <= 15 and chunk >= 1 and all(flag in (0, 1) for flag in tma)
    # Every tuning field is chosen by the tuner (names as in the C struct).
    from hybrid_ep_infer._native import Tuning

    assert set(tuning.DISPATCH_FIELDS + tuning.COMBINE_FIELDS) == {name for name, _ in Tuning._fields_[2:]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.uint8])
def test_synthetic_workload_routes_every_token_to_k_distinct_experts(dtype):
    config = BufferConfig.create(rank=1, world_size=2, hidden=256, max_tokens=64, num_experts=8, top_k=3,
                                 dtype=dtype, layout="contiguous", pad_multiple=1, capacity=None)
    x, scales, idx, weights = tuning._synthetic_inputs(config, torch.device("cpu"))
    assert x.shape == (64, 256) and x.dtype == dtype
    assert (scales is not None) == (dtype != torch.bfloat16)
    if scales is not None:
        assert scales.shape == (64, 2) and bool((scales == 1).all())
    assert idx.shape == (64, 3) and idx.dtype == torch.int32 and idx.is_contiguous()
    assert int(idx.min()) >= 0 and int(idx.max()) < 8
    assert all(len(set(row)) == 3 for row in idx.tolist())
    assert weights.shape == (64, 3) and weights.dtype == torch.float32
    # Every rank draws its own routing, the same each time.
    again = tuning._synthetic_inputs(config, torch.device("cpu"))[2]
    assert torch.equal(idx, again)
