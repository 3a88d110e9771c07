"""The construction-time tuner's CPU-checkable parts: its candidates, its synthetic
workload, its choice from gathered times, and tune() itself with a stand-in context and
clock. (tests/test_cuda_combine.py runs it on GPUs: the same candidate on every rank, and
results that do not depend on the tuning.)"""

import types

import pytest
import torch

from hybrid_ep_infer import tuning
from hybrid_ep_infer.config import BufferConfig

from dist_utils import single_rank_group


def test_candidates_are_valid_and_include_the_defaults():
    planned = tuple(c[1:] for c in tuning.DISPATCH_CANDIDATES if c[0] == tuning.PLANNED)
    for candidates, fields, default in ((planned, tuning.DISPATCH_FIELDS[1:], (4, 1, 0, 0)),
                                        (tuning.COMBINE_CANDIDATES, tuning.COMBINE_FIELDS, (13, 1))):
        assert default in candidates
        assert len(set(candidates)) == len(candidates)
        for candidate in candidates:
            assert len(candidate) == len(fields)
            warps, chunk, *tma = candidate
            assert 1 <= warps <= 15 and chunk >= 1 and all(flag in (0, 1) for flag in tma)
    # One low-latency candidate, first (it wins ties); only buffers built with it time it.
    assert [c[0] for c in tuning.DISPATCH_CANDIDATES].count(tuning.LOW_LATENCY) == 1
    assert tuning.DISPATCH_CANDIDATES[0][0] == tuning.LOW_LATENCY
    assert tuning.dispatch_candidates(False) == tuning.DISPATCH_CANDIDATES[1:]
    assert tuning.dispatch_candidates(True) == tuning.DISPATCH_CANDIDATES
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


def test_choice_is_the_candidate_whose_slowest_rank_is_fastest():
    nd, nc = len(tuning.DISPATCH_CANDIDATES), len(tuning.COMBINE_CANDIDATES)
    rank0 = [100.0] * nd + [50.0] * nc
    rank1 = [100.0] * nd + [50.0] * nc
    rank0[3], rank1[3] = 10.0, 90.0   # fastest on rank 0 alone, 90 at worst
    rank0[7], rank1[7] = 60.0, 60.0   # 60 at worst: the choice
    rank0[nd + 2], rank1[nd + 2] = 49.0, 1.0    # combine: 49 at worst ...
    rank0[nd + 5], rank1[nd + 5] = 49.0, 49.0   # ... tied: the first wins
    chosen, report = tuning.choose([rank0, rank1])
    assert tuple(chosen[f] for f in tuning.DISPATCH_FIELDS) == tuning.DISPATCH_CANDIDATES[7]
    assert tuple(chosen[f] for f in tuning.COMBINE_FIELDS) == tuning.COMBINE_CANDIDATES[2]
    assert len(report) == nd + nc
    assert report[3] == ("dispatch", tuning.DISPATCH_CANDIDATES[3], 90.0)
    assert report[nd + 2] == ("combine", tuning.COMBINE_CANDIDATES[2], 49.0)
    # The same gathered lists in another order of ranks: the same choice.
    assert tuning.choose([rank1, rank0])[0] == chosen


def test_choice_without_combine_times_leaves_combine_fields_out():
    times = [float(i) for i in range(len(tuning.DISPATCH_CANDIDATES), 0, -1)]  # the last is fastest
    chosen, report = tuning.choose([times])
    assert set(chosen) == set(tuning.DISPATCH_FIELDS)
    assert tuple(chosen[f] for f in tuning.DISPATCH_FIELDS) == tuning.DISPATCH_CANDIDATES[-1]
    assert [op for op, _, _ in report] == ["dispatch"] * len(tuning.DISPATCH_CANDIDATES)


class _FakeContext:
    """Stands in for the native context: keeps a tuning, counts calls."""

    def __init__(self):
        self.fields = dict(dispatch_path=1, dispatch_send_warps=4, dispatch_chunk_tokens=1, dispatch_send_tma=0,
                           dispatch_expand_tma=0, combine_reduce_warps=13, combine_chunk_tokens=1)
        self.calls = {"dispatch": 0, "combine": 0}

    def set_tuning(self, **fields):
        self.fields.update(fields)

    def get_tuning(self):
        return dict(self.fields)

    def dispatch(self, *args):
        self.calls["dispatch"] += 1

    def combine(self, *args):
        self.calls["combine"] += 1

    def take_errors(self):
        return None


def test_tune_times_every_candidate_sets_the_choice_and_caches_it(monkeypatch):
    """tune() on CPU with a stand-in context: every candidate timed once, the fastest set
    and cached (a second buffer of the shape times nothing), the report kept, and each
    dispatch path's fastest candidate read from it."""
    single_rank_group()
    config = BufferConfig.create(rank=0, world_size=1, hidden=256, max_tokens=32, num_experts=4, top_k=2,
                                 dtype=torch.bfloat16, layout="contiguous", pad_multiple=1, capacity=None)
    context = _FakeContext()
    backend = types.SimpleNamespace(config=config, device=torch.device("cpu"), context=context, supports_split=True,
                                    outputs=types.SimpleNamespace(hidden=torch.zeros(64, 256, dtype=torch.bfloat16)),
                                    combine_output=lambda rows: torch.zeros(rows, 256, dtype=torch.bfloat16))
    fastest_dispatch, fastest_combine = tuning.DISPATCH_CANDIDATES[5], tuning.COMBINE_CANDIDATES[7]

    def fake_time(configure, call, device):  # "measures" the tuning the candidate set
        configure()
        call()
        now = context.get_tuning()
        if call.__name__ == "dispatch":
            return 1.0 if tuple(now[f] for f in tuning.DISPATCH_FIELDS) == fastest_dispatch else 2.0
        return 1.0 if tuple(now[f] for f in tuning.COMBINE_FIELDS) == fastest_combine else 2.0

    monkeypatch.setattr(tuning, "_time", fake_time)
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "reports", {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in")

    chosen = tuning.tune(backend, None, num_sms=24)
    assert tuple(chosen[f] for f in tuning.DISPATCH_FIELDS) == fastest_dispatch
    assert tuple(chosen[f] for f in tuning.COMBINE_FIELDS) == fastest_combine
    assert context.get_tuning() == chosen
    # One warm-up dispatch, then each candidate once by fake_time.
    assert context.calls == {"dispatch": 1 + len(tuning.DISPATCH_CANDIDATES), "combine": len(tuning.COMBINE_CANDIDATES)}
    (report,) = tuning.reports.values()
    assert len(report) == len(tuning.DISPATCH_CANDIDATES) + len(tuning.COMBINE_CANDIDATES)
    # Each path's fastest candidate (what the benchmark times each path with).
    assert tuning.fastest_per_path(backend, 24) == {
        tuning.PLANNED: dict(zip(tuning.DISPATCH_FIELDS, fastest_dispatch)),
        tuning.LOW_LATENCY: dict(zip(tuning.DISPATCH_FIELDS, tuning.DISPATCH_CANDIDATES[0]))}
    assert tuning.fastest_per_path(backend, 16) == {}  # a shape never tuned

    other = _FakeContext()
    backend.context = other
    assert tuning.tune(backend, None, num_sms=24) == chosen
    assert other.calls == {"dispatch": 0, "combine": 0} and other.get_tuning() == chosen
