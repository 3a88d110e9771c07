"""Where ranks run (CPU): the rank -> GPU map, the SM budget of ranks that share a GPU,
the byte gather used at construction, how GPU tests decide to skip and how their checks fail."""

import pytest

from hybrid_ep_infer import placement

import dist_utils
from dist_utils import spawn


def test_ranks_go_one_per_gpu_then_round_robin():
    assert [placement.gpu_for_rank(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [placement.gpu_for_rank(r, 1) for r in range(3)] == [0, 0, 0]
    assert [placement.gpu_for_rank(r, 2) for r in range(5)] == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="no CUDA GPU"):
        placement.gpu_for_rank(0, 0)


def test_default_num_sms_fits_every_rank_that_shares_the_gpu():
    assert placement.fit_num_sms(None, 132, 1, "cuda:0") == placement.DEFAULT_NUM_SMS
    assert placement.fit_num_sms(None, 132, 5, "cuda:0") == 24  # 26 fit: the default stays
    assert placement.fit_num_sms(None, 132, 6, "cuda:0") == 22
    assert placement.fit_num_sms(None, 132, 8, "cuda:0") == 16
    assert placement.fit_num_sms(None, 132, 132, "cuda:0") == 1
    with pytest.raises(ValueError, match="at least one SM per rank"):
        placement.fit_num_sms(None, 132, 133, "cuda:0")


def test_an_explicit_num_sms_that_cannot_fit_is_an_error_naming_the_numbers():
    assert placement.fit_num_sms(16, 132, 8, "cuda:0") == 16
    assert placement.fit_num_sms(132, 132, 1, "cuda:0") == 132
    with pytest.raises(ValueError) as info:
        placement.fit_num_sms(24, 132, 8, "cuda:0")
    message = str(info.value)
    assert "num_sms=24" in message and "8 ranks share cuda:0" in message and "8 x 24 = 192 > 132" in message
    assert "num_sms <= 16" in message
    with pytest.raises(ValueError, match="exceeds the 132 SMs"):
        placement.fit_num_sms(133, 132, 1, "cuda:0")


def test_busiest_gpu_counts_the_most_ranks_on_one_device():
    assert placement.busiest_gpu_ranks([b"a", b"b", b"c"]) == 1
    assert placement.busiest_gpu_ranks([b"a", b"a", b"b", b"a"]) == 3


def _gather_worker(rank, world_size):
    blobs = [b"", b"\x00\x01\x02" * 40, b"rank two"][: world_size]
    got = placement.all_gather_bytes(blobs[rank], None)
    assert got == blobs, got


def test_all_gather_bytes_keeps_every_rank_s_blob_and_length():
    spawn(3, _gather_worker)


def test_all_gather_bytes_on_one_rank(one_rank_group):
    assert placement.all_gather_bytes(b"only me", None) == [b"only me"]


def test_gpu_tests_skip_with_a_reason_or_run_shared(monkeypatch):
    monkeypatch.setattr(dist_utils, "gpu_count", lambda: 0)
    assert "none is visible" in dist_utils.placement_problem(2)
    monkeypatch.setattr(dist_utils, "gpu_count", lambda: 2)
    monkeypatch.delenv(dist_utils.SHARE_GPU_ENV, raising=False)
    assert dist_utils.placement_problem(2) is None
    assert "needs 4 CUDA GPUs; 2 visible" in dist_utils.placement_problem(4)
    monkeypatch.setenv(dist_utils.SHARE_GPU_ENV, "1")
    assert dist_utils.placement_problem(8) is None
    assert dist_utils.placement_problem(16) is None
    assert "at most 8 per GPU" in dist_utils.placement_problem(17)
    assert dist_utils.gpu_backend() == "gloo"


def test_world_sizes_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(dist_utils.WORLD_SIZES_ENV, raising=False)
    assert dist_utils.gpu_world_sizes((4, 2)) == [4, 2]
    monkeypatch.setenv(dist_utils.WORLD_SIZES_ENV, "2, 4,8")
    assert dist_utils.gpu_world_sizes((4, 2)) == [2, 4, 8]
    monkeypatch.setenv(dist_utils.WORLD_SIZES_ENV, "0")
    with pytest.raises(ValueError, match="positive rank counts"):
        dist_utils.gpu_world_sizes((2,))


def test_a_failed_gpu_check_names_itself_and_its_case():
    """GPU workers wrap each check in dist_utils.check, so a failure says which one broke."""
    rank = "( on rank 0)?"  # where an earlier test left a process group
    with pytest.raises(dist_utils.CheckFailed, match=rf"^graph replay failed for W=2{rank}: AssertionError: replay 3$"):
        with dist_utils.check("graph replay", "W=2"):
            raise AssertionError("replay 3")
    with pytest.raises(dist_utils.CheckFailed, match=rf"^no leaks failed{rank}: RuntimeError: boom$"):
        with dist_utils.check("no leaks"):
            raise RuntimeError("boom")
    with dist_utils.check("passes", "any case"):
        pass
