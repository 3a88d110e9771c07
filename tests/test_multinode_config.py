"""EPBuffer's ranks_per_node (docs/MULTINODE.md): reported; below the group size, refused
by the CUDA backend with the reason where the multi-node library is missing; the
reference backend's results do not depend on it. Bad values: test_validation.py. The
multi-node backend itself: test_multinode_backend.py (GPU)."""

import pytest

from hybrid_ep_infer import EPBuffer
from hybrid_ep_infer import buffer as buffer_module
from hybrid_ep_infer.multinode import library_status, multinode_unavailable_reason

from dist_utils import spawn
from moe_cases import Case, bits_equal, check_dispatch, experts_on_dispatch_output, make_inputs, oracle_combine

H, T, E, K = 128, 4, 4, 2


def test_one_rank_group_is_one_node(one_rank_group):
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference") as buf:
        assert (buf.ranks_per_node, buf.num_nodes) == (1, 1)


def test_the_reason_says_what_is_missing():
    loaded, status = library_status()
    reason = multinode_unavailable_reason()
    if loaded:
        assert reason is None
    else:  # what was looked for and how to build it, or why it did not load
        assert reason == status and ("NVSHMEM" in reason or "multi-node library" in reason), reason


def nodes_worker(rank: int, world_size: int) -> None:
    case = Case(world_size=world_size, hidden=256, max_tokens=12, num_experts=4 * world_size, top_k=3,
                routing="skewed", seed=3)
    inputs = make_inputs(case)
    mine = inputs[rank]
    for ranks_per_node in (None, 1, 2, world_size):
        with EPBuffer(hidden=case.hidden, max_tokens=case.max_tokens, num_experts=case.num_experts,
                      top_k=case.top_k, backend="reference", ranks_per_node=ranks_per_node) as buf:
            G = world_size if ranks_per_node is None else ranks_per_node
            assert (buf.ranks_per_node, buf.num_nodes) == (G, world_size // G), ranks_per_node
            result = buf.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_tokens=mine.num_tokens)
            check_dispatch(case, inputs, rank, result)
            out = buf.combine(experts_on_dispatch_output(result, rank, case.num_local_experts), result.handle)
            assert bits_equal(out, oracle_combine(case, inputs, rank, True)), f"ranks_per_node={ranks_per_node}"

    # The CUDA backend below the group size without the multi-node library: refused with the
    # reason, before anything is built (the checks of CUDA and of the library are stood in
    # for, so this runs on any machine).
    buffer_module.cuda_backend_unavailable_reason = lambda: None
    buffer_module.multinode_unavailable_reason = lambda: "libhybrid_ep_infer_mn.so not found (test)"
    with pytest.raises(RuntimeError, match="ranks_per_node=2 \\(fewer than the group's 4 ranks\\) needs the "
                                           "multi-node backend: libhybrid_ep_infer_mn.so not found \\(test\\)\\. "
                                           "Use backend='reference'"):
        EPBuffer(hidden=H, max_tokens=T, num_experts=4 * world_size, top_k=K, backend="cuda", ranks_per_node=2)


def test_reference_results_do_not_depend_on_ranks_per_node():
    spawn(4, nodes_worker)


def test_multinode_backend_close_stays_local_after_check_errors_took_the_timeout():
    """check_errors clears the error block's timeout count; the workspace's close, a
    collective NVSHMEM free, must still see it and free locally (a peer may be gone)."""
    from hybrid_ep_infer.backends.multinode import MultinodeBackend
    from hybrid_ep_infer.errors import ERROR_BLOCK_WORDS, ErrorKind, ErrorSnapshot

    def snapshot(timeouts: int) -> ErrorSnapshot:
        words = [0] * ERROR_BLOCK_WORDS
        words[ErrorKind.TIMEOUT] = timeouts
        return ErrorSnapshot.from_words(words)

    class Context:  # the error block of a context whose wait timed out once
        block = snapshot(1)

        def take_errors(self):
            taken, self.block = self.block, snapshot(0)
            return taken

        def peek_timeout(self):
            return self.block if self.block.count(ErrorKind.TIMEOUT) else None

    backend = MultinodeBackend.__new__(MultinodeBackend)  # no GPU here: only the bookkeeping
    backend._peer_timed_out, backend.context = False, Context()
    assert backend._saw_timeout()  # seen in the block
    backend._peer_timed_out, backend.context = False, Context()
    assert backend.take_errors().count(ErrorKind.TIMEOUT) == 1  # check_errors' read clears the block
    assert backend.context.peek_timeout() is None
    assert backend._saw_timeout()  # ... and close still frees locally
    backend.context = None
    assert backend._saw_timeout()
    fresh = MultinodeBackend.__new__(MultinodeBackend)
    fresh._peer_timed_out, fresh.context = False, None
    assert not fresh._saw_timeout()
