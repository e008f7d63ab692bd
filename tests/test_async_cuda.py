"""The asynchronous engine on a GPU: copy streams, the caller's events, device <-> host traffic.

Every test here needs CUDA (marked ``gpu``, skipped elsewhere). A producer that is slow on purpose
(``torch.cuda._sleep`` spins the GPU) shows whether the store's copy streams wait for the caller's work.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_bit_equal, check_invariants, gpu, make_blocks, make_keys, make_tier_setup, settle

SPIN_CYCLES = 200_000_000  # about 0.1 s of GPU time: far longer than a copy


@gpu
def test_put_async_waits_for_the_kernel_that_produces_its_blocks(tmp_path, layout):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys, blocks = make_keys(4, seed=1), make_blocks(4, layout, seed=2)
    with setup.open(device=2, host=2, disk=8) as store:
        assert store.device.type == "cuda" and store._manager._streams.active
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            x = torch.zeros_like(blocks, device="cuda")
            torch.cuda._sleep(SPIN_CYCLES)
            x.copy_(blocks.cuda(), non_blocking=True)  # lands only after the spin
            future = store.put_async(keys, x)
        assert future.result(60) == 4
        assert_bit_equal(store.get(keys).cpu(), blocks)  # two of them went through host and disk
        check_invariants(store, {k: b for k, b in zip(keys, blocks)})


@gpu
def test_get_into_a_cuda_out_waits_for_the_callers_last_use_of_it(tmp_path, layout):
    setup = make_tier_setup("device+host", tmp_path, layout)
    keys, blocks = make_keys(3, seed=3), make_blocks(3, layout, seed=4)
    with setup.open(device=1, host=4) as store:
        store.put(keys, blocks)  # two on the host: the get copies host -> device on a copy stream
        side = torch.cuda.Stream()
        out = torch.zeros_like(blocks, device="cuda")
        with torch.cuda.stream(side):
            torch.cuda._sleep(SPIN_CYCLES)
            out.fill_(0)  # the caller's last write to out, queued before the get
            got = store.get_async(keys, out)
        got.result(60)
        torch.cuda.synchronize()
        assert_bit_equal(out.cpu(), blocks)


@gpu
@pytest.mark.parametrize("host_codec", ["none", "fp8"])
def test_prefetch_and_demotion_traffic_on_a_gpu(tmp_path, layout, host_codec):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    setup.extra = {"host_codec": host_codec}
    keys = make_keys(12, seed=5)
    blocks = torch.randn(12, *layout.block_shape).to(layout.dtype)
    with setup.open(device=4, host=4, disk=16) as store:
        for i in range(0, 12, 4):
            store.put_async(keys[i:i + 4], blocks[i:i + 4].cuda()).result(60)
        settle(store)
        assert store.prefetch(keys[:4]).result(60) == 4
        got = store.get(keys[:4])
        assert got.device.type == "cuda"
        if host_codec == "none":
            assert_bit_equal(got.cpu(), blocks[:4])
        else:
            error = (got.cpu().double() - blocks[:4].double()).norm() / blocks[:4].double().norm()
            assert float(error) < 0.04
        assert store.stats().prefetched >= 1
        check_invariants(store, None if host_codec != "none" else {k: b for k, b in zip(keys, blocks)})


@gpu
def test_no_copy_runs_on_the_default_stream_during_a_put(tmp_path, layout):
    """The default stream is kept busy; a put whose copies ran there would wait behind it, so a put that
    returns while the default stream still spins shows its copies ran elsewhere."""
    setup = make_tier_setup("device+host", tmp_path, layout)
    keys, blocks = make_keys(4, seed=6), make_blocks(4, layout, seed=7).cuda()
    with setup.open(device=2, host=4) as store:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):  # the producer's event is on `side`, which is idle
            blocks_ready = blocks.clone()
        side.synchronize()
        spin = torch.cuda.Event(enable_timing=False)
        with torch.cuda.stream(torch.cuda.default_stream()):
            torch.cuda._sleep(4 * SPIN_CYCLES)
            spin.record()
        with torch.cuda.stream(side):
            store.put(keys, blocks_ready)  # device -> host demotions of two blocks
        assert not spin.query(), "the put waited for the default stream"
        torch.cuda.synchronize()
        assert_bit_equal(store.get(keys).cpu(), blocks_ready.cpu())
