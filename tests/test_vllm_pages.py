"""vLLM's KV-cache tensors read and written as tierkv blocks (``tierkv.integrations.vllm.pages``).

The fakes build, with torch alone, every tensor form vLLM hands ``register_kv_caches``: the 4-D
``[blocks, heads, tokens, 2 * head_size]`` views of one buffer in each of the six ``KVCacheLayout`` orders (with
kernel-block splitting and padded pages too), and the older 5-D FlashAttention / FlashInfer forms, NHD and HND.
What a block should hold comes from plain per-token indexing of each layer's logical shape, never from the view
arithmetic under test. Caches hold random bits (NaN patterns included), so every comparison is bitwise.

The last tests run the same checks on tensors from vLLM's own allocator (``allocate_kv_cache``), when vllm
imports.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from math import prod
from typing import Callable, Iterator

import pytest
import torch

from tierkv.integrations.vllm.pages import PagedKV, layer_sort_key

NUM_BLOCKS, BLOCK, HEADS, DIM, LAYERS = 7, 4, 2, 8, 3
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LAYOUTS = ["LBNHC", "LBHNC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"]
BLOCK_COMPACT = ["LBNHC", "LBHNC", "BLHNC", "BLNHC"]  # the layouts in which vLLM pads pages
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
IDS = [5, 0, 3]  # not consecutive, not sorted, no repeats


# ---------------------------------------------------------------------------------------------------------------
# fakes: what register_kv_caches receives, built with torch only


def random_bits(shape, dtype, device, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.to(device).view(dtype).view(shape)


def layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def shuffled(caches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM's dict order is not a contract: PagedKV must order layers itself."""
    items = list(caches.items())
    random.Random(0).shuffle(items)
    return dict(items)


@dataclass
class Fake:
    caches: dict[str, torch.Tensor]
    cells: Callable[[torch.Tensor, int], Iterator[tuple[int, int, torch.Tensor]]]
    layout_name: str | None  # what vLLM's cache_config.kv_cache_layout would say
    copy_ops: int

    def read(self, name: str, block: int) -> torch.Tensor:
        """Layer ``name``'s block as ``[2, tokens, heads, dim]``, token by token."""
        out = torch.empty(2, BLOCK, HEADS, DIM, dtype=self.caches[name].dtype, device=self.caches[name].device)
        for kv, token, cell in self.cells(self.caches[name], block):
            out[kv, token] = cell
        return out

    def write(self, name: str, block: int, value: torch.Tensor) -> None:
        for kv, token, cell in self.cells(self.caches[name], block):
            cell.copy_(value[kv, token])

    def expected(self, ids) -> torch.Tensor:
        names = sorted(self.caches, key=layer_sort_key)
        return torch.stack([torch.stack([self.read(n, b) for n in names]) for b in ids])


def packed_cells(t: torch.Tensor, block: int):
    """vLLM 0.32: ``[B * r, H, N, (K | V)]``; token ``k`` of block ``b`` is kernel row ``b * r + k // N``."""
    rows_per_block, tokens = t.shape[0] // NUM_BLOCKS, t.shape[2]
    for token in range(BLOCK):
        row, pos = block * rows_per_block + token // tokens, token % tokens
        yield 0, token, t[row, :, pos, :DIM]
        yield 1, token, t[row, :, pos, DIM:]


def fake_packed(layout: str, dtype, device="cpu", *, kernel_split: int = 1, pad_bytes: int = 0, seed=0) -> Fake:
    """One int8 buffer holding logical ``[L, B, H, N, C]`` in ``layout``'s physical order, like vLLM's
    ``allocate_kv_cache``; each layer's tensor is a strided view of it. ``pad_bytes`` pads every page (the L/B
    cell) as vLLM does for hybrid models in block-compact layouts."""
    size = dict(L=LAYERS, B=NUM_BLOCKS * kernel_split, H=HEADS, N=BLOCK // kernel_split, C=2 * DIM)
    physical = [size[axis] for axis in layout]
    if pad_bytes:
        assert set(layout[:2]) == {"L", "B"}
        page = prod(physical[2:]) * dtype.itemsize
        buf = random_bits((prod(physical[:2]) * (page + pad_bytes),), torch.uint8, device, seed)
        pages = buf.view(-1, page + pad_bytes)[:, :page].view(dtype)
        phys = pages.unflatten(0, physical[:2]).unflatten(-1, physical[2:])
    else:
        phys = random_bits(physical, dtype, device, seed)
    logical = phys.permute([layout.index(axis) for axis in "LBHNC"])
    caches = {layer_name(i): logical[i] for i in range(LAYERS)}
    return Fake(shuffled(caches), packed_cells, layout, copy_ops=1)


def fake_legacy(form: str, order: str, dtype, device="cpu", seed=0) -> Fake:
    """Older vLLM: one allocation per layer, ``[2, B, N, H, D]`` (FlashAttention) or ``[B, 2, N, H, D]``
    (FlashInfer), heads outside tokens in memory for HND."""
    hnd = order == "HND"
    caches = {}
    for i in range(LAYERS):
        if form == "flash_attn":
            t = random_bits((2, NUM_BLOCKS, HEADS, BLOCK, DIM) if hnd else (2, NUM_BLOCKS, BLOCK, HEADS, DIM),
                            dtype, device, seed + i)
        else:
            t = random_bits((NUM_BLOCKS, 2, HEADS, BLOCK, DIM) if hnd else (NUM_BLOCKS, 2, BLOCK, HEADS, DIM),
                            dtype, device, seed + i)
        caches[layer_name(i)] = t.transpose(2, 3) if hnd else t

    def cells(t, block):
        for kv in range(2):
            for token in range(BLOCK):
                yield kv, token, (t[kv, block, token] if form == "flash_attn" else t[block, kv, token])

    return Fake(shuffled(caches), cells, order, copy_ops=LAYERS)


def fake_legacy_cross_layer(dtype, device="cpu", seed=0) -> Fake:
    """Older vLLM's cross-layer allocation: one ``[B, L, 2, N, H, D]`` buffer, layer ``l`` the view ``[:, l]``."""
    buf = random_bits((NUM_BLOCKS, LAYERS, 2, BLOCK, HEADS, DIM), dtype, device, seed)
    caches = {layer_name(i): buf[:, i] for i in range(LAYERS)}

    def cells(t, block):
        for kv in range(2):
            for token in range(BLOCK):
                yield kv, token, t[block, kv, token]

    return Fake(shuffled(caches), cells, None, copy_ops=1)


FORMS: dict[str, Callable[..., Fake]] = {
    **{layout: (lambda dtype, device="cpu", seed=0, _l=layout: fake_packed(_l, dtype, device, seed=seed))
       for layout in LAYOUTS},
    **{f"{layout}-kernel-blocks": (lambda dtype, device="cpu", seed=0, _l=layout:
                                   fake_packed(_l, dtype, device, kernel_split=2, seed=seed))
       for layout in ("LBNHC", "LBHNC")},
    **{f"{layout}-padded": (lambda dtype, device="cpu", seed=0, _l=layout:
                            fake_packed(_l, dtype, device, pad_bytes=64, seed=seed))
       for layout in BLOCK_COMPACT},
    **{f"{form}-{order}": (lambda dtype, device="cpu", seed=0, _f=form, _o=order:
                           fake_legacy(_f, _o, dtype, device, seed=seed))
       for form in ("flash_attn", "flashinfer") for order in ("NHD", "HND")},
    "flashinfer-cross-layer": fake_legacy_cross_layer,
}


def paged(fake: Fake, **overrides) -> PagedKV:
    args = dict(num_blocks=NUM_BLOCKS, block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM,
                dtype=next(iter(fake.caches.values())).dtype, kv_cache_layout=fake.layout_name)
    return PagedKV(fake.caches, **{**args, **overrides})


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(bits(actual), bits(expected))


def storages(caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every allocation behind the caches, whole, as bytes: padding and other layers' pages included."""
    seen = {}
    for t in caches.values():
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    return [torch.empty(0, dtype=torch.uint8, device=s.device).set_(s) for s in seen.values()]


# ---------------------------------------------------------------------------------------------------------------
# every form, every dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_gather_reads_each_block_where_vllm_keeps_it(form, dtype, device):
    fake = FORMS[form](dtype, device)
    kv = paged(fake)
    assert kv.layout.block_shape == (LAYERS, 2, BLOCK, HEADS, DIM) and kv.layout.dtype == dtype
    assert kv.layer_names == tuple(layer_name(i) for i in range(LAYERS))
    assert kv.copy_ops == fake.copy_ops

    out = kv.gather(IDS)
    assert out.shape == (len(IDS), LAYERS, 2, BLOCK, HEADS, DIM) and out.device == torch.device(device)
    assert_bit_equal(out, fake.expected(IDS))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_scatter_writes_the_named_blocks_and_not_one_byte_more(form, dtype, device):
    fake = FORMS[form](dtype, device)
    kv = paged(fake)
    before = [s.clone() for s in storages(fake.caches)]
    old = {(n, b): fake.read(n, b) for n in fake.caches for b in IDS}
    new = random_bits((len(IDS), *kv.layout.block_shape), dtype, device, seed=99)

    kv.scatter(IDS, new)

    assert_bit_equal(fake.expected(IDS), new)
    assert_bit_equal(kv.gather(IDS), new)
    # Undo exactly the named blocks by plain indexing: anything else scatter touched would still differ.
    for (name, block), value in old.items():
        fake.write(name, block, value)
    for now, then in zip(storages(fake.caches), before):
        assert torch.equal(now, then)


@pytest.mark.parametrize("form", FORMS)
def test_blocks_saved_under_one_layout_load_under_any_other(form):
    """tierkv blocks are layout-free: a block gathered from an LBNHC cache scatters into any other form."""
    source = fake_packed("LBNHC", torch.bfloat16, seed=1)
    target = FORMS[form](torch.bfloat16, seed=2)
    blocks = paged(source).gather([6, 2])
    paged(target).scatter([1, 4], blocks)
    assert_bit_equal(target.expected([1, 4]), source.expected([6, 2]))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8], ids=str)
@pytest.mark.parametrize("form", ["BLNHC", "LBHNC-kernel-blocks", "flash_attn-HND"])
def test_fp8_caches_round_trip_bit_exact(form, dtype):
    """vLLM's fp8 KV caches (float8 or uint8 storage): torch has no CPU index_copy_ for float8."""
    fake = FORMS[form](dtype)
    kv = paged(fake)
    new = random_bits((2, *kv.layout.block_shape), dtype, "cpu", seed=5)
    kv.scatter([3, 1], new)
    assert_bit_equal(kv.gather([3, 1]), new)
    assert_bit_equal(fake.expected([3, 1]), new)


# ---------------------------------------------------------------------------------------------------------------
# block ids, out, layers


def test_gather_allows_repeats_and_any_id_container():
    fake = fake_packed("BHLNC", torch.float16)
    kv = paged(fake)
    expected = fake.expected([2, 2, 6])
    for ids in ([2, 2, 6], (2, 2, 6), torch.tensor([2, 2, 6], dtype=torch.int32), range(2, 3)):
        got = kv.gather(ids)
        assert_bit_equal(got, expected if len(got) == 3 else expected[:1])


def test_gather_into_a_given_out_and_empty_batches():
    fake = fake_packed("LHBNC", torch.bfloat16)
    kv = paged(fake)
    out = torch.empty(2, *kv.layout.block_shape, dtype=torch.bfloat16)
    assert kv.gather([4, 1], out=out) is out
    assert_bit_equal(out, fake.expected([4, 1]))
    # out need not be contiguous: a slice of a bigger batch
    bigger = torch.zeros(2, LAYERS + 1, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    kv.gather([4, 1], out=bigger[:, 1:])
    assert_bit_equal(bigger[:, 1:], out)

    empty = kv.gather([])
    assert empty.shape == (0, *kv.layout.block_shape)
    before = [s.clone() for s in storages(fake.caches)]
    kv.scatter([], empty)
    assert all(torch.equal(a, b) for a, b in zip(storages(fake.caches), before))


def test_layers_are_ordered_by_layer_index_not_by_name_or_dict_order():
    fake = fake_packed("LBNHC", torch.float32)
    names = sorted(fake.caches, key=layer_sort_key)
    renamed = {"model.layers.10.self_attn.attn": fake.caches[names[2]],
               "model.layers.2.self_attn.attn": fake.caches[names[1]],
               "model.layers.1.self_attn.attn": fake.caches[names[0]]}
    kv = PagedKV(renamed, num_blocks=NUM_BLOCKS, block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM)
    assert kv.layer_names == ("model.layers.1.self_attn.attn", "model.layers.2.self_attn.attn",
                              "model.layers.10.self_attn.attn")
    assert_bit_equal(kv.gather([3]), fake.expected([3]))


def test_a_layer_sharing_another_layers_cache_is_stored_once():
    """Cross-layer KV sharing: vLLM hands the target layer's tensor under the sharing layer's name too."""
    fake = fake_packed("BLHNC", torch.bfloat16)
    caches = dict(fake.caches)
    caches["model.layers.3.self_attn.attn"] = caches[layer_name(1)]
    kv = PagedKV(caches, num_blocks=NUM_BLOCKS, block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM)
    assert kv.layout.num_layers == LAYERS
    assert kv.aliases == {"model.layers.3.self_attn.attn": layer_name(1)}
    assert_bit_equal(kv.gather([0]), fake.expected([0]))


# ---------------------------------------------------------------------------------------------------------------
# what it refuses, and how it says so


def args(**overrides):
    return {**dict(num_blocks=NUM_BLOCKS, block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM), **overrides}


def test_an_mla_latent_cache_is_refused_naming_layer_shape_and_strides():
    latent = torch.zeros(NUM_BLOCKS, 1, BLOCK, 576, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected layer 'model.layers.0.self_attn.attn' .*got shape "
                                         r"\[7, 1, 4, 576\] strides \[2304, 2304, 576, 1\].*MLA"):
        PagedKV({layer_name(0): latent}, **args(num_kv_heads=1, head_size=576))


@pytest.mark.parametrize("shape", [
    (NUM_BLOCKS, HEADS, BLOCK, DIM + 4),               # K and V of different sizes (diff-KV backends)
    (NUM_BLOCKS, HEADS + 1, BLOCK, 2 * DIM),           # another head count
    (NUM_BLOCKS * 3, HEADS, 1, 2 * DIM),               # kernel blocks that do not tile a block
    (NUM_BLOCKS + 1, 2, BLOCK, HEADS, DIM),            # legacy form with the wrong block count
    (NUM_BLOCKS, BLOCK, HEADS, DIM),                   # neither form
], ids=str)
def test_shapes_it_cannot_read_are_refused(shape):
    t = torch.zeros(shape, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"expected layer 'model.layers.0.self_attn.attn' .*got shape .*strides"):
        PagedKV({layer_name(0): t}, **args())


def test_overlapping_views_are_refused():
    t = torch.zeros(1, HEADS, BLOCK, 2 * DIM).expand(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM)
    with pytest.raises(ValueError, match="address each element once"):
        PagedKV({layer_name(0): t}, **args())


def test_legacy_form_with_two_blocks_is_ambiguous():
    t = torch.zeros(2, 2, BLOCK, HEADS, DIM)
    with pytest.raises(ValueError, match="read the same"):
        PagedKV({layer_name(0): t}, **args(num_blocks=2))


def test_strides_that_contradict_the_named_layout_are_refused():
    fake = fake_packed("LBNHC", torch.bfloat16)
    with pytest.raises(ValueError, match=r"in KV cache layout LBHNC \(outermost first LBHN\), got .*"
                                         r"\(outermost first LBNH\)"):
        paged(fake, kv_cache_layout="LBHNC")
    with pytest.raises(ValueError, match="expected kv_cache_layout one of"):
        paged(fake, kv_cache_layout="NHC")
    paged(fake, kv_cache_layout="NHD")  # vLLM's legacy alias of LBNHC


def test_layers_that_disagree_are_refused():
    fake = fake_packed("LBNHC", torch.bfloat16)
    caches = dict(fake.caches)
    caches[layer_name(1)] = caches[layer_name(1)].float()
    with pytest.raises(ValueError, match=r"expected layer 'model.layers.1.self_attn.attn' with dtype "
                                         r"torch.bfloat16 on cpu, got torch.float32 on cpu"):
        PagedKV(caches, **args())
    with pytest.raises(ValueError, match="expected layer .* with dtype torch.float16"):
        PagedKV(fake.caches, **args(dtype=torch.float16))
    caches = dict(fake.caches)
    caches[layer_name(1)] = fake_packed("LBNHC", torch.bfloat16, kernel_split=2).caches[layer_name(1)]
    with pytest.raises(ValueError, match=r"expected layer 'model.layers.1.self_attn.attn' in kernel blocks of 4 "
                                         r"tokens like 'model.layers.0.self_attn.attn', got shape \[14, 2, 2, 16\]"):
        PagedKV(caches, **args())
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        PagedKV({layer_name(0): [torch.zeros(1)]}, **args())
    with pytest.raises(ValueError, match="expected at least one layer"):
        PagedKV({}, **args())
    with pytest.raises(ValueError, match="expected block_size to be a positive int, got 0"):
        PagedKV(fake.caches, **args(block_size=0))


def test_bad_block_ids_and_buffers_are_refused():
    fake = fake_packed("BLNHC", torch.bfloat16)
    kv = paged(fake)
    blocks = kv.gather([1, 2])
    with pytest.raises(ValueError, match=r"expected block ids in \[0, 7\), got 7"):
        kv.gather([1, 7])
    with pytest.raises(ValueError, match=r"expected block ids in \[0, 7\), got -1"):
        kv.scatter(torch.tensor([-1, 2]), blocks)
    with pytest.raises(ValueError, match="expected distinct block ids to write to, got 3 2 times"):
        kv.scatter([3, 3], blocks)
    with pytest.raises(TypeError):
        kv.gather([1.5])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        kv.gather(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"expected src of shape \[2, 3, 2, 4, 2, 8\], dtype torch.bfloat16 on "
                                         r"cpu, got \[2, 3, 2, 4, 2, 8\], torch.float16 on cpu"):
        kv.scatter([1, 2], blocks.half())
    with pytest.raises(ValueError, match=r"expected out of shape \[1, "):
        kv.gather([1], out=blocks)


# ---------------------------------------------------------------------------------------------------------------
# tensors from vLLM's own allocator


# vLLM's allocate_kv_cache and KVCacheLayout, which these tests call, arrived in vLLM 0.32.
ALLOCATOR = "needs vLLM >= 0.32 (allocate_kv_cache with KVCacheLayout)"


def vllm_caches(layout: str, specs: dict, groups: list[list[str]], kernel_block_sizes=None, seed=0):
    """``kv_caches`` exactly as vLLM's GPU model runner builds them (``get_kv_cache_config_from_groups`` then
    ``allocate_kv_cache``), on the CPU, filled with random bits."""
    pytest.importorskip("vllm.v1.kv_cache_layout", reason=ALLOCATOR)
    from vllm.config import DeviceConfig, VllmConfig
    from vllm_compat import create_kv_cache_group_specs, get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    config.cache_config.kv_cache_layout = layout
    kv_cache_groups = create_kv_cache_group_specs(specs, groups)
    page = max(spec.page_size_bytes for spec in specs.values())
    kv_cache_config = get_kv_cache_config_from_groups(config, kv_cache_groups, NUM_BLOCKS * page * len(specs))
    caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), KVCacheLayout[layout], kernel_block_sizes)
    for s in storages(caches):
        s.copy_(torch.randint(0, 256, s.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return caches, kv_cache_config


def attention_spec(dtype=torch.bfloat16, **kw):
    pytest.importorskip("vllm.v1.kv_cache_layout", reason=ALLOCATOR)
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=dtype, **kw)


def vllm_block_kv(cache: torch.Tensor, num_blocks: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one scheduler block, ``[r, tokens / r, heads, dim]`` each, read the way vLLM's own code does:
    ``group_kernel_blocks`` (the offloading connector) then FlashAttention's ``transpose(1, 2).split``."""
    from vllm.v1.kv_cache_interface import group_kernel_blocks
    grouped = group_kernel_blocks(cache, num_blocks)  # [B, r, H, N, 2 * D], or [B, H, N, 2 * D] when r == 1
    kernel_blocks = (grouped if grouped.dim() == 5 else grouped.unsqueeze(1))[block]
    return kernel_blocks.transpose(1, 2).split(DIM, dim=-1)


def check_round_trip(caches: dict[str, torch.Tensor], num_blocks: int, layout: str, ids: list[int],
                     dtype=torch.bfloat16) -> PagedKV:
    kv = PagedKV(caches, num_blocks=num_blocks, block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM,
                 dtype=dtype, kv_cache_layout=layout)
    names = sorted(caches, key=layer_sort_key)
    assert kv.layer_names == tuple(names)

    def vllm_view(b):
        return torch.stack([torch.stack([x.flatten(0, 1) for x in vllm_block_kv(caches[n], num_blocks, b)])
                            for n in names])

    assert_bit_equal(kv.gather(ids), torch.stack([vllm_view(b) for b in ids]))
    before = [s.clone() for s in storages(caches)]
    old = {(n, b): [x.clone() for x in vllm_block_kv(caches[n], num_blocks, b)] for n in names for b in ids}
    new = random_bits((len(ids), *kv.layout.block_shape), dtype, "cpu", seed=7)
    kv.scatter(ids, new)
    assert_bit_equal(torch.stack([vllm_view(b) for b in ids]), new)
    for (name, block), (k, v) in old.items():
        now_k, now_v = vllm_block_kv(caches[name], num_blocks, block)
        now_k.copy_(k)
        now_v.copy_(v)
    assert all(torch.equal(a, b) for a, b in zip(storages(caches), before))
    return kv


@pytest.mark.parametrize("kernel_block", [None, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vllm_allocated_caches_round_trip(layout, kernel_block):
    spec = attention_spec()
    specs = {layer_name(i): spec for i in range(LAYERS)}
    try:
        caches, config = vllm_caches(layout, specs, [list(specs)],
                                     kernel_block_sizes=[kernel_block] if kernel_block else None)
    except ValueError as e:
        # vLLM splits a block into kernel blocks only where it is one dense page (LBNHC, LBHNC)
        assert kernel_block and layout not in ("LBNHC", "LBHNC") and "kernel blocks" in str(e)
        return
    kv = check_round_trip(caches, config.num_blocks, layout, [config.num_blocks - 1, 0, 3])
    assert kv.copy_ops == 1


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_vllm_fp8_cache_round_trips(layout):
    spec = attention_spec(dtype=torch.uint8)  # vLLM's kv_cache_dtype="fp8" storage
    specs = {layer_name(i): spec for i in range(LAYERS)}
    caches, config = vllm_caches(layout, specs, [list(specs)])
    check_round_trip(caches, config.num_blocks, layout, [2, 5], dtype=torch.uint8)


@pytest.mark.parametrize("layout", ["LBNHC", "BLNHC", "BHLNC"])
def test_vllm_hybrid_model_one_paged_kv_per_cache_group(layout):
    """Full and sliding-window groups overlay the same bytes; a block id belongs to one group at a time."""
    pytest.importorskip("vllm.v1.kv_cache_layout", reason=ALLOCATOR)
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    full = attention_spec()
    window = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16,
                               sliding_window=2 * BLOCK)
    specs = {layer_name(i): (full if i % 2 == 0 else window) for i in range(4)}
    groups = [[layer_name(0), layer_name(2)], [layer_name(1), layer_name(3)]]
    caches, config = vllm_caches(layout, specs, groups)
    assert caches[layer_name(0)].data_ptr() == caches[layer_name(1)].data_ptr()  # the overlay
    for group, ids in zip(groups, ([1, 4], [0, 6])):
        check_round_trip({n: caches[n] for n in group}, config.num_blocks, layout, ids)


def test_vllm_mla_cache_is_refused():
    pytest.importorskip("vllm.v1.kv_cache_layout", reason=ALLOCATOR)
    from vllm.v1.kv_cache_interface import MLAAttentionSpec
    spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=2 * DIM, dtype=torch.bfloat16)
    caches, config = vllm_caches("LBNHC", {layer_name(0): spec}, [[layer_name(0)]])
    with pytest.raises(ValueError, match="MLA"):
        PagedKV(caches, num_blocks=config.num_blocks, block_size=BLOCK, num_kv_heads=1, head_size=2 * DIM)
