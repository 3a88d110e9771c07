"""Custom ops on the reference backend (CPU): opcheck, torch.compile(fullgraph=True) of
two MoE layers sharing one buffer (equal to eager, ops kept in program order), a stale
combine (zeros, counted), and the per-call overhead of the op path. The split halves'
ops too: opcheck of each (its precondition set up before every check), equal to the
one-call ops eagerly, and compiled layers with unrelated work between the halves that
give the one-call layers' bits, every op in program order."""

import time

import pytest
import torch

from hybrid_ep_infer import EPBuffer, ErrorKind, RoutingDataError, ops
from hybrid_ep_infer.buffer import PendingCombine, PendingDispatch

from dist_utils import spawn

H, T, E, K = 128, 16, 8, 2


def make_buffer(**kw):
    args = dict(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference", pad_multiple=4)
    args.update(kw)
    return EPBuffer(**args)


def routing(seed: int, m: int = T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(m, E, generator=g)
    return x, logits


def moe_layer(buffer, x, logits, expert_scales):
    """routing -> dispatch -> experts (a per-expert scale) -> combine."""
    # Top-k of the raw logits: exact in any compiled kernel (a softmax could round
    # differently under inductor, and this test compares bits).
    weights, idx = logits.topk(K)
    dispatched = ops.dispatch(buffer, x, idx, weights)
    expert = dispatched.row_expert.clamp(min=0).long()
    y = (dispatched.hidden.float() * expert_scales[expert].unsqueeze(-1)).to(torch.bfloat16)
    return ops.combine(buffer, y, dispatched, idx)


def two_layers(buffer, x, logits1, logits2, expert_scales):
    h = moe_layer(buffer, x, logits1, expert_scales)
    return moe_layer(buffer, h, logits2, expert_scales)


def split_moe_layer(buffer, x, logits, expert_scales, other):
    """:func:`moe_layer` on the split halves, with unrelated work (``other @ other``, as
    another micro-batch's) between each send and its receive."""
    weights, idx = logits.topk(K)
    ops.dispatch_send(buffer, x, idx, weights)
    other = other @ other
    dispatched = ops.dispatch_recv(buffer)
    expert = dispatched.row_expert.clamp(min=0).long()
    y = (dispatched.hidden.float() * expert_scales[expert].unsqueeze(-1)).to(torch.bfloat16)
    out = ops.combine_send(buffer, y, dispatched, idx)
    other = other @ other
    return ops.combine_recv(buffer, out), other


def split_two_layers(buffer, x, logits1, logits2, expert_scales, other):
    h, other = split_moe_layer(buffer, x, logits1, expert_scales, other)
    out, other = split_moe_layer(buffer, h, logits2, expert_scales, other)
    return out, other


def test_opcheck_dispatch_and_combine(one_rank_group):
    with make_buffer() as buf:
        x, logits = routing(0)
        weights, idx = torch.softmax(logits, dim=-1).topk(K)
        out = buf.dispatch_outputs
        n = torch.tensor([T - 3], dtype=torch.int32)
        for num_tokens_device, num_tokens in ((None, -1), (None, 5), (n, -1)):
            torch.library.opcheck(torch.ops.hybrid_ep_infer.dispatch.default,
                                  (buf.id, x, idx, weights, None, num_tokens_device, num_tokens, out.hidden,
                                   out.scales, out.weights, out.row_expert, out.tokens_per_expert, out.offsets))
        ops.dispatch(buf, x, idx, weights)
        y = out.hidden.clone()
        combined = torch.empty(T, H, dtype=torch.bfloat16)
        for weighted in (True, False):
            torch.library.opcheck(torch.ops.hybrid_ep_infer.combine.default,
                                  (buf.id, y, idx, out.weights, out.row_expert, out.tokens_per_expert, out.offsets,
                                   weighted, combined))


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def finish_pending(buf) -> None:
    """Receive whatever half an opcheck left pending (a check may run the op once or not at all)."""
    if isinstance(buf._pending, PendingDispatch):
        ops.dispatch_recv(buf)
    elif isinstance(buf._pending, PendingCombine):
        ops.combine_recv(buf, torch.empty(T, H, dtype=torch.bfloat16))


def opcheck_each(op, args, buf, precondition=lambda: None) -> None:
    """opcheck one check at a time, each on a buffer in the state the op needs: a half's op
    refuses to run twice in a row (the buffer holds one pending half)."""
    for util in OPCHECK_UTILS:
        precondition()
        torch.library.opcheck(op, args, test_utils=util)
        finish_pending(buf)


def test_opcheck_split_halves(one_rank_group):
    with make_buffer() as buf:
        x, logits = routing(0)
        weights, idx = torch.softmax(logits, dim=-1).topk(K)
        out, state = buf.dispatch_outputs, buf.op_state
        n = torch.tensor([T - 3], dtype=torch.int32)
        for num_tokens_device, num_tokens in ((None, -1), (None, 5), (n, -1)):
            opcheck_each(torch.ops.hybrid_ep_infer.dispatch_send.default,
                         (buf.id, x, idx, weights, None, num_tokens_device, num_tokens, state), buf)
        opcheck_each(torch.ops.hybrid_ep_infer.dispatch_recv.default,
                     (buf.id, state, out.hidden, out.scales, out.weights, out.row_expert, out.tokens_per_expert,
                      out.offsets), buf, precondition=lambda: ops.dispatch_send(buf, x, idx, weights))
        y = out.hidden.clone()
        combined = torch.empty(T, H, dtype=torch.bfloat16)
        for weighted in (True, False):
            opcheck_each(torch.ops.hybrid_ep_infer.combine_send.default,
                         (buf.id, y, idx, out.weights, out.row_expert, out.tokens_per_expert, out.offsets, weighted,
                          combined, state), buf)
        opcheck_each(torch.ops.hybrid_ep_infer.combine_recv.default, (buf.id, combined, state), buf,
                     precondition=lambda: ops.combine_send(buf, y, out, idx, out=combined))
        # The one-call ops with the state (the wrappers pass it; the raw ops above also run without).
        torch.library.opcheck(torch.ops.hybrid_ep_infer.dispatch.default,
                              (buf.id, x, idx, weights, None, None, -1, out.hidden, out.scales, out.weights,
                               out.row_expert, out.tokens_per_expert, out.offsets, state))
        torch.library.opcheck(torch.ops.hybrid_ep_infer.combine.default,
                              (buf.id, y, idx, out.weights, out.row_expert, out.tokens_per_expert, out.offsets, True,
                               combined, state))


def test_split_ops_match_the_one_call_ops(one_rank_group):
    """Eager: the halves' ops give the one-call ops' bits; a stale combine_send gives zeros, counted."""
    with make_buffer() as buf:
        x, logits = routing(11)
        weights, idx = logits.topk(K)
        n = torch.tensor([T - 2], dtype=torch.int32)
        d = ops.dispatch(buf, x, idx, weights, num_tokens=n)
        want_d = {name: t.clone() for name, t in d._asdict().items() if isinstance(t, torch.Tensor)}
        y = d.hidden.clone()
        want = ops.combine(buf, y, d, idx, weighted=False).clone()

        x_copy, idx_copy = x.clone(), idx.clone()
        ops.dispatch_send(buf, x_copy, idx_copy, weights, num_tokens=n)
        x_copy.zero_()  # inputs may be overwritten between the halves
        idx_copy.fill_(-1)
        got_d = ops.dispatch_recv(buf)
        assert got_d.handle is None
        for name, t in want_d.items():
            assert torch.equal(getattr(got_d, name).view(torch.uint8), t.view(torch.uint8)), name
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
        assert ops.combine_send(buf, y, got_d, idx, out=out, weighted=False) is out
        got = ops.combine_recv(buf, out)
        assert got is out and torch.equal(got.view(torch.int16), want.view(torch.int16))
        got = ops.combine_recv(buf, ops.combine_send(buf, y, got_d, idx, weighted=False))  # out in buffer memory
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        buf.check_errors()

        stale_idx = logits.topk(K + 1)[1][:, 1:].contiguous()  # another routing than the latest dispatch's
        stale = ops.combine_recv(buf, ops.combine_send(buf, y, got_d, stale_idx))
        assert torch.equal(stale, torch.zeros_like(stale)), "a stale combine must write zeros"
        with pytest.raises(RoutingDataError, match="stale combine") as error:
            buf.check_errors()
        assert error.value.counts == {ErrorKind.STALE_COMBINE: 1}


def test_ops_match_the_eager_api(one_rank_group):
    with make_buffer() as buf:
        x, logits = routing(1)
        weights, idx = torch.softmax(logits, dim=-1).topk(K)
        eager = buf.dispatch(x, idx, weights)
        want = buf.combine(eager.hidden.clone(), eager.handle, out=torch.empty(T, H, dtype=torch.bfloat16))
        got_d = ops.dispatch(buf, x, idx, weights, num_tokens=torch.tensor([T], dtype=torch.int32))
        got = ops.combine(buf, got_d.hidden.clone(), got_d, idx)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        with pytest.raises(ValueError, match="rows"):
            ops.combine(buf, got_d.hidden.clone(), got_d, idx, out=torch.empty(T - 1, H, dtype=torch.bfloat16))
        # A negative count is refused (the op's schema reads -1 as "not given": all rows).
        for call in (ops.dispatch, ops.dispatch_send):
            with pytest.raises(ValueError, match="num_tokens must be >= 0, got -5"):
                call(buf, x, idx, weights, num_tokens=-5)
        again = ops.dispatch(buf, x, idx, weights)  # nothing was left pending
        assert torch.equal(again.hidden.view(torch.int16), got_d.hidden.view(torch.int16))


def check_stale_combine(rank: int = 0) -> None:
    """The misuse: a combine for an older dispatch, after a newer one. Its routing differs
    from the latest dispatch's, so it is stale: zeros, one STALE_COMBINE count, raised by
    check_errors(). Routing with the same ids after sanitizing (a copy, another dtype, other
    invalid ids) is not stale."""
    with make_buffer() as buf:
        x, logits_a = routing(20 + rank)
        _, logits_b = routing(40 + rank)
        weights_a, idx_a = logits_a.topk(K)
        weights_b, idx_b = logits_b.topk(K)
        idx_a[0, 0] = E  # invalid: dropped and counted
        d_a = ops.dispatch(buf, x, idx_a, weights_a)
        y_a = d_a.hidden.clone()
        want = ops.combine(buf, y_a, d_a, idx_a).clone()
        same_ids = idx_a.to(torch.int32)  # another tensor and dtype, the same routing ...
        same_ids[0, 0] = 5 * E  # ... after sanitizing: one invalid id for another
        again = ops.combine(buf, y_a, d_a, same_ids)
        assert torch.equal(again.view(torch.int16), want.view(torch.int16))
        with pytest.raises(RoutingDataError) as error:
            buf.check_errors()
        assert error.value.counts == {ErrorKind.INVALID_EXPERT_ID: 1}

        ops.dispatch(buf, x, idx_b, weights_b)
        stale = ops.combine(buf, y_a, d_a, idx_a)
        assert torch.equal(stale, torch.zeros_like(stale)), "a stale combine must write zeros"
        with pytest.raises(RoutingDataError, match="stale combine") as error:
            buf.check_errors()
        assert error.value.counts == {ErrorKind.STALE_COMBINE: 1}

        d_b = ops.dispatch(buf, x, idx_b, weights_b)  # the buffer works on
        assert torch.equal(ops.combine(buf, d_b.hidden.clone(), d_b, idx_b).view(torch.int16),
                           buf.combine(d_b.hidden.clone(), buf._latest).view(torch.int16))
        buf.check_errors()

    with make_buffer(debug=True) as buf:  # debug: raised by the call itself
        d_b = ops.dispatch(buf, x, idx_b, weights_b)
        ops.dispatch(buf, x, logits_a.topk(K)[1], weights_a)
        with pytest.raises(RoutingDataError, match="stale combine"):
            ops.combine(buf, d_b.hidden.clone(), d_b, idx_b)


def test_stale_combine_is_zero_and_counted(one_rank_group):
    check_stale_combine()


def stale_combine_worker(rank: int, world_size: int) -> None:
    check_stale_combine(rank)


def test_stale_combine_two_ranks():
    """Every rank still takes part in the exchange: no rank waits forever."""
    spawn(2, stale_combine_worker)


def op_order(graph: torch.fx.Graph, with_work: bool = False) -> list[str]:
    """Our ops in graph order, direct or wrapped by auto_functionalized (and each matmul as
    "work" with ``with_work``)."""
    names = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if "auto_functionalized" in str(target) and node.args:
            target = node.args[0]
        name = str(target)
        if "hybrid_ep_infer." in name:  # hybrid_ep_infer.<op>.default
            names.append(name.split("hybrid_ep_infer.")[1].split(".")[0])
        elif with_work and "mm" in name:
            names.append("work")
    return names


def check_compiled_two_layers(backend: str, record_graphs: bool) -> None:
    with make_buffer() as buf:
        expert_scales = torch.tensor([0.5, 2.0, -1.0, 0.25, 1.5, -0.5, 3.0, 1.0])[: buf.num_local_experts]
        x, logits1 = routing(2)
        _, logits2 = routing(3)
        want = two_layers(buf, x, logits1, logits2, expert_scales).clone()

        dynamo_graphs, aot_graphs = [], []
        if record_graphs:
            from torch._dynamo.backends.common import aot_autograd

            def fw_compiler(gm, example_inputs):
                aot_graphs.append(gm.graph)
                return gm.forward

            aot_backend = aot_autograd(fw_compiler=fw_compiler)

            def compile_backend(gm, example_inputs):
                dynamo_graphs.append(gm.graph)
                return aot_backend(gm, example_inputs)
        else:
            compile_backend = backend
        torch._dynamo.reset()
        compiled = torch.compile(two_layers, fullgraph=True, backend=compile_backend)
        got = compiled(buf, x, logits1, logits2, expert_scales)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        for seed in range(4, 7):  # fresh routing, same compiled graph
            x, logits1 = routing(seed)
            want = two_layers(buf, x, logits1, logits2, expert_scales).clone()
            got = compiled(buf, x, logits1, logits2, expert_scales)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        if record_graphs:
            assert len(dynamo_graphs) == 1, "fullgraph: one graph"
            order = ["dispatch", "combine", "dispatch", "combine"]
            assert op_order(dynamo_graphs[0]) == order
            assert op_order(aot_graphs[0]) == order, aot_graphs[0]


def check_compiled_split_layers(backend: str, record_graphs: bool) -> None:
    """Two layers on the split halves, compiled: the one-call layers' bits, and (recorded
    graphs) every op of the buffer in program order, the unrelated work between each send
    and its receive."""
    with make_buffer() as buf:
        expert_scales = torch.tensor([0.5, 2.0, -1.0, 0.25, 1.5, -0.5, 3.0, 1.0])[: buf.num_local_experts]
        other = torch.randn(8, 8) / 4
        graphs = []
        if record_graphs:
            from torch._dynamo.backends.common import aot_autograd

            def fw_compiler(gm, example_inputs):
                graphs.append(gm.graph)
                return gm.forward

            compile_backend = aot_autograd(fw_compiler=fw_compiler)
        else:
            compile_backend = backend
        torch._dynamo.reset()
        compiled = torch.compile(split_two_layers, fullgraph=True, backend=compile_backend)
        for seed in range(2, 6):
            x, logits1 = routing(seed)
            _, logits2 = routing(seed + 10)
            want = two_layers(buf, x, logits1, logits2, expert_scales).clone()
            eager, _ = split_two_layers(buf, x, logits1, logits2, expert_scales, other)
            assert torch.equal(eager.view(torch.int16), want.view(torch.int16))
            got, got_other = compiled(buf, x, logits1, logits2, expert_scales, other)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
            assert torch.allclose(got_other, torch.linalg.matrix_power(other, 16))
        buf.check_errors()
        if record_graphs:
            assert len(graphs) == 1, "fullgraph: one graph"
            layer = ["dispatch_send", "work", "dispatch_recv", "combine_send", "work", "combine_recv"]
            assert op_order(graphs[0], with_work=True) == layer + layer, graphs[0]


def test_compile_split_layers_program_order(one_rank_group):
    check_compiled_split_layers("aot_eager", record_graphs=True)


def test_compile_split_layers_inductor(one_rank_group):
    check_compiled_split_layers("inductor", record_graphs=False)


def test_compile_two_layers_program_order(one_rank_group):
    check_compiled_two_layers("aot_eager", record_graphs=True)


def test_compile_two_layers_inductor(one_rank_group):
    check_compiled_two_layers("inductor", record_graphs=False)


def two_rank_worker(rank: int, world_size: int) -> None:
    check_compiled_two_layers("aot_eager", record_graphs=True)
    check_compiled_split_layers("aot_eager", record_graphs=True)


def test_compile_two_layers_two_ranks():
    spawn(2, two_rank_worker)


def test_op_path_overhead(one_rank_group):
    """Per-call Python overhead of the op path over the method (reported, not asserted)."""
    with make_buffer() as buf:
        x, logits = routing(9)
        weights, idx = torch.softmax(logits, dim=-1).topk(K)

        def per_call(fn, reps=200):
            for _ in range(10):
                fn()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - start) / reps * 1e6

        method = per_call(lambda: buf.dispatch(x, idx, weights))
        op = per_call(lambda: ops.dispatch(buf, x, idx, weights))
        print(f"\n[op overhead] reference dispatch, 1 rank, CPU: method {method:.0f} us/call, op {op:.0f} us/call, "
              f"difference {op - method:.0f} us")
