"""The C++ CPU codec kernels (tierkv._C quantize / dequantize / all_finite) against the torch reference, bit for bit.

Every ISA the machine has (scalar, AVX2, AVX-512) is checked: the scalar kernels are the fallback, and a bug in a
vector tail only shows at odd sizes, so shapes include D, T, H, L of 1 and sizes that are not multiples of 8/16.
Skipped where the native module is not in use (TIERKV_FORCE_REFERENCE=1, or not built).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierkv
from tierkv import ops
from tierkv.codec import make_codec, reference
from tierkv.codec.format import CODEC_IDS, DTYPE_IDS, HEADER_NBYTES, EncodedFormat

_module = ops.native()
NATIVE = _module if _module is not None and hasattr(_module, "quantize") else None
pytestmark = pytest.mark.skipif(NATIVE is None, reason="native codec kernels not in use")

LOSSY = ["fp8", "int8"]
FLOATS = [torch.float16, torch.bfloat16, torch.float32]
ALL_ISAS = ["scalar", "avx2", "avx512"]


def _supported_isas() -> list[str]:
    if NATIVE is None:
        return []
    before = NATIVE.cpu_isa()
    found = []
    try:
        for isa in ALL_ISAS:
            try:
                NATIVE.set_cpu_isa(isa)
            except ValueError:
                continue
            found.append(isa)
    finally:
        NATIVE.set_cpu_isa(before)
    return found


ISAS = _supported_isas()


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Run the test with each ISA's kernels; restore the default afterwards."""
    if request.param not in ISAS:
        pytest.skip(f"this CPU lacks {request.param}")
    before = NATIVE.cpu_isa()
    NATIVE.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        NATIVE.set_cpu_isa(before)


def layout_of(L: int, T: int, H: int, D: int, dtype: torch.dtype) -> tierkv.KVLayout:
    return tierkv.KVLayout(num_layers=L, num_kv_heads=H, head_dim=D, block_tokens=T, dtype=dtype)


def data(kind: str, n: int, layout: tierkv.KVLayout, seed: int) -> torch.Tensor:
    """``n`` finite blocks of ``layout`` of one kind of content."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *layout.block_shape)
    if kind == "normal":
        x = torch.randn(shape, generator=g)
    elif kind == "outliers":  # a few channels 50x, as real K caches have
        x = torch.randn(shape, generator=g)
        D = layout.head_dim
        x[..., torch.randperm(D, generator=g)[:max(1, D // 8)]] *= 50
    elif kind == "zeros":
        x = torch.zeros(shape)
        x[..., ::2] = -0.0
    elif kind == "large":  # far beyond 448 and 127, up to what the dtype holds
        big = torch.finfo(layout.dtype).max
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(0, 12, shape, generator=g).float()) * 1000
        x = x.clamp(-big, big)
        x.view(-1)[:: 7] = big
    elif kind == "tiny":  # float32 subnormals, dtype subnormals, values near the 2^-126 scale floor
        e = torch.randint(-149, -100, shape, generator=g).float()
        x = torch.exp2(e) * torch.randn(shape, generator=g).sign()
        if layout.dtype == torch.float16:
            x = x * 2.0**110  # float16 subnormals (2^-24 .. 2^-14) and around them
    elif kind == "mixed":  # groups whose elements span many binades (the subnormal fp8 range is hit)
        e = torch.randint(-40, 20, shape, generator=g).float()
        x = torch.randn(shape, generator=g) * torch.exp2(e)
    elif kind == "bits":  # random bit patterns, non-finite ones replaced by zero
        raw = torch.randint(0, 256, (n, layout.block_nbytes), dtype=torch.uint8, generator=g)
        x = raw.view(layout.dtype).reshape(shape)
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    else:
        raise AssertionError(kind)
    big = torch.finfo(layout.dtype).max
    return x.clamp(-big, big).to(layout.dtype)


KINDS = ["normal", "outliers", "zeros", "large", "tiny", "mixed", "bits"]


def native_encode(codec: str, blocks: torch.Tensor) -> torch.Tensor:
    """Encoded rows from the native kernel (called directly, one pointer per block)."""
    n, L, _, T, H, D = blocks.shape
    fmt = EncodedFormat(codec, layout_of(L, T, H, D, blocks.dtype))
    src = blocks.contiguous()
    out = torch.full((n, fmt.nbytes), 0xAB, dtype=torch.uint8)  # garbage: padding must be zeroed
    src_ptrs = np.array([src[i].data_ptr() for i in range(n)], dtype=np.uint64)
    dst_ptrs = np.array([out[i].data_ptr() for i in range(n)], dtype=np.uint64)
    NATIVE.quantize(CODEC_IDS[codec], DTYPE_IDS[blocks.dtype], L, T, H, D, src_ptrs, dst_ptrs)
    return out


def native_decode(codec: str, encoded: torch.Tensor, layout: tierkv.KVLayout) -> torch.Tensor:
    n = encoded.shape[0]
    L, _, T, H, D = layout.block_shape
    out = torch.empty((n, *layout.block_shape), dtype=layout.dtype)
    src_ptrs = np.array([encoded[i].data_ptr() for i in range(n)], dtype=np.uint64)
    dst_ptrs = np.array([out[i].data_ptr() for i in range(n)], dtype=np.uint64)
    NATIVE.dequantize(CODEC_IDS[codec], DTYPE_IDS[layout.dtype], L, T, H, D, src_ptrs, dst_ptrs)
    return out


def reference_encode(codec: str, blocks: torch.Tensor) -> torch.Tensor:
    n, L, _, T, H, D = blocks.shape
    fmt = EncodedFormat(codec, layout_of(L, T, H, D, blocks.dtype))
    out = torch.empty((n, fmt.nbytes), dtype=torch.uint8)
    reference.encode(blocks, fmt, out)
    return out


def reference_decode(codec: str, encoded: torch.Tensor, layout: tierkv.KVLayout) -> torch.Tensor:
    n = encoded.shape[0]
    if n == 1:
        # reference.decode cannot view one row's scales as float32 when the row length is not a multiple of 4
        # (``.contiguous()`` of a [1, k] slice keeps the row stride); two rows take its copying path.
        encoded = encoded.expand(2, -1).contiguous()
    out = torch.empty((encoded.shape[0], *layout.block_shape), dtype=layout.dtype)
    reference.decode(encoded, EncodedFormat(codec, layout), out)
    return out[:n]


def first_difference(got: torch.Tensor, want: torch.Tensor) -> str:
    a, b = got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
    diff = (a != b).nonzero().flatten()
    i = int(diff[0])
    return f"{diff.numel()} of {b.numel()} bytes differ, first at byte {i}: got {int(a[i])}, expected {int(b[i])}"


def check_same_as_reference(codec: str, blocks: torch.Tensor) -> None:
    n, L, _, T, H, D = blocks.shape
    layout = layout_of(L, T, H, D, blocks.dtype)
    got = native_encode(codec, blocks)
    want = reference_encode(codec, blocks)
    assert torch.equal(got, want), f"quantize {codec} {blocks.dtype} {tuple(blocks.shape)}: " + first_difference(got, want)
    got_d = native_decode(codec, want, layout)
    want_d = reference_decode(codec, want, layout)
    assert torch.equal(got_d.view(torch.uint8), want_d.view(torch.uint8)), (
        f"dequantize {codec} {blocks.dtype} {tuple(blocks.shape)}: " + first_difference(got_d, want_d))


# -- bit-exact against the reference --------------------------------------------------------------------------------
SHAPES = [(1, 1, 1, 1), (1, 1, 1, 3), (2, 3, 1, 17), (1, 4, 3, 5), (2, 16, 4, 128), (1, 5, 2, 64), (3, 2, 5, 33),
          (1, 7, 1, 16), (1, 1, 8, 15), (2, 16, 2, 80)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("codec", LOSSY)
def test_kernels_match_the_reference_bit_for_bit(isa, codec, dtype, kind):
    for i, (L, T, H, D) in enumerate(SHAPES):
        layout = layout_of(L, T, H, D, dtype)
        check_same_as_reference(codec, data(kind, 3, layout, seed=i))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(L=st.integers(1, 3), T=st.integers(1, 20), H=st.integers(1, 6), D=st.integers(1, 70),
       n=st.integers(1, 3), codec=st.sampled_from(LOSSY), dtype=st.sampled_from(FLOATS),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_match_the_reference(isa, L, T, H, D, n, codec, dtype, kind, seed):
    check_same_as_reference(codec, data(kind, n, layout_of(L, T, H, D, dtype), seed))


def _with_group_max(x: torch.Tensor, codec: str, qmax: float) -> torch.Tensor:
    """Set one element of every scale group to ``qmax``, so scale == 1 and y == x exactly."""
    x = x.clone()
    if codec == "fp8":
        x[:, :, :, 0, :, 0] = qmax                # every (layer, K/V, head)
    else:
        x[:, :, 0, 0, :, :] = qmax                # K: every channel at token 0
        x[:, :, 1, :, :, 0] = qmax                # V: every (token, head) at dim 0
    return x


def test_fp8_conversion_matches_torch_over_the_float32_range(isa):
    """With scale 1 the kernel's fp8 codes are the plain conversion of the input: check it against torch's
    ``.to(torch.float8_e4m3fn)`` for every float32 in [0, 448] whose low 8 bits are 0, 1 or 255 (every rounding tie
    of the normal and subnormal fp8 ranges, and its neighbours), both signs."""
    top = int(torch.tensor(448.0).view(torch.int32))
    base = torch.arange(0, top + 1, 256, dtype=torch.int64)
    bits = torch.cat([base, base + 1, base + 255]).clamp_max(top).to(torch.int32)
    values = bits.view(torch.float32)
    values = torch.cat([values, -values])
    D = 64
    rows = -(-values.numel() // (2 * D))
    padded = torch.zeros(rows * 2 * D)
    padded[:values.numel()] = values
    block = padded.reshape(1, 1, 2, rows, 1, D)
    block = _with_group_max(block, "fp8", 448.0)
    got = native_encode("fp8", block)
    fmt = EncodedFormat("fp8", layout_of(1, rows, 1, D, torch.float32))
    codes = got[0, fmt.values_offset:]
    want = block.reshape(-1).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes, want), first_difference(codes, want)
    check_same_as_reference("fp8", block)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("codec", LOSSY)
def test_values_on_rounding_ties(isa, codec, dtype):
    """Inputs that land exactly halfway between two codes, with scale 1 (one element per group at qmax)."""
    g = torch.Generator().manual_seed(5)
    L, T, H, D = 2, 9, 3, 37
    shape = (2, L, 2, T, H, D)
    if codec == "int8":  # k + 0.5 for integers k: round half to even
        x = (torch.randint(-127, 127, shape, generator=g) + 0.5).float()
        qmax = 127.0
    else:  # midpoints between neighbouring fp8 values, normal and subnormal
        grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        mids = (grid[:-1] + grid[1:]) / 2
        mids = mids[mids.to(dtype).float() == mids]  # keep the midpoints the block dtype holds exactly
        x = mids[torch.randint(0, mids.numel(), shape, generator=g)]
        x = x * torch.randint(0, 2, shape, generator=g).mul(2).sub(1)
        qmax = 448.0
    check_same_as_reference(codec, _with_group_max(x, codec, qmax).to(dtype))


def test_non_contiguous_blocks_through_the_public_codec():
    """``make_codec(...).encode`` takes any strides: a transposed view must encode like its contiguous copy."""
    layout = layout_of(2, 8, 4, 32, torch.bfloat16)
    for name in LOSSY:
        codec = make_codec(name, layout)
        # [n, L, 2, T, H, D] laid out as [n, L, 2, H, T, D] in memory
        storage = data("outliers", 3, layout_of(2, 4, 8, 32, torch.bfloat16), seed=1)
        blocks = storage.transpose(3, 4)
        assert not blocks.is_contiguous() and tuple(blocks.shape[1:]) == layout.block_shape
        got = torch.empty((3, codec.nbytes), dtype=torch.uint8)
        codec.encode(blocks, got)
        want = reference_encode(name, blocks.contiguous())
        assert torch.equal(got, want), f"{name}: " + first_difference(got, want)
        decoded = torch.empty((3, *layout.block_shape), dtype=layout.dtype)
        codec.decode(got, decoded)
        want_d = reference_decode(name, want, layout)
        assert torch.equal(decoded.view(torch.uint8), want_d.view(torch.uint8)), name


@pytest.mark.parametrize("codec", LOSSY)
def test_encoded_rows_with_an_offset_and_padding(codec):
    """Rows inside a larger buffer (not 64-byte aligned) are written in full: header, scales, zeroed padding."""
    layout = layout_of(1, 3, 1, 5, torch.float16)
    fmt = EncodedFormat(codec, layout)
    blocks = data("normal", 2, layout, seed=3)
    buf = torch.full((2 * fmt.nbytes + 3,), 0xCD, dtype=torch.uint8)
    rows = buf[3:].view(2, fmt.nbytes)
    make_codec(codec, layout).encode(blocks, rows)
    assert torch.equal(rows, reference_encode(codec, blocks))
    assert bytes(rows[0, :HEADER_NBYTES].tolist()) == fmt.header()
    assert torch.all(buf[:3] == 0xCD)


def test_fp8_nan_codes_decode_like_the_reference(isa):
    """0x7f / 0xff are NaN in e4m3fn: a hand-made row holding them decodes as the reference decodes it."""
    for dtype in FLOATS:
        layout = layout_of(1, 2, 1, 19, dtype)
        encoded = reference_encode("fp8", data("normal", 1, layout, seed=0))
        fmt = EncodedFormat("fp8", layout)
        encoded[0, fmt.values_offset::5] = 0x7F
        encoded[0, fmt.values_offset + 2::7] = 0xFF
        got = native_decode("fp8", encoded, layout)
        want = reference_decode("fp8", encoded, layout)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{dtype}: " + first_difference(got, want)


# -- all_finite ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
def test_all_finite_finds_nan_and_inf_anywhere(isa, dtype):
    big = torch.finfo(dtype).max
    for numel in (1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257, 1000, 4099):
        x = torch.linspace(-big, big, numel, dtype=torch.float64).to(dtype)
        x[numel // 2] = torch.finfo(dtype).tiny / 4  # a subnormal is finite
        assert NATIVE.all_finite(DTYPE_IDS[dtype], x.data_ptr(), numel), (dtype, numel)
        positions = sorted({0, numel - 1, numel // 2, max(0, numel - 3), min(numel - 1, 64), (numel * 7) // 8})
        for pos in positions:
            for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
                y = x.clone()
                y[pos] = bad
                assert not NATIVE.all_finite(DTYPE_IDS[dtype], y.data_ptr(), numel), (dtype, numel, pos, bad)
                # the element just past the range is not looked at
                if pos == numel - 1 and numel > 1:
                    assert NATIVE.all_finite(DTYPE_IDS[dtype], y.data_ptr(), numel - 1), (dtype, numel, pos)


def test_all_finite_of_nothing_is_true():
    assert NATIVE.all_finite(2, 0, 0)


def test_check_finite_through_the_codec_module():
    from tierkv.codec import check_finite
    x = torch.randn(4, 33).to(torch.bfloat16)
    check_finite(x)
    check_finite(x.t())  # non-contiguous
    x[3, 32] = float("inf")
    with pytest.raises(ValueError, match="expected finite"):
        check_finite(x)


# -- arguments --------------------------------------------------------------------------------------------------------
def _pointers(n: int = 1) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    layout = layout_of(1, 2, 1, 4, torch.float32)
    src = torch.zeros((n, *layout.block_shape))
    dst = torch.zeros((n, EncodedFormat("fp8", layout).nbytes), dtype=torch.uint8)
    s = np.array([src[i].data_ptr() for i in range(n)], dtype=np.uint64)
    d = np.array([dst[i].data_ptr() for i in range(n)], dtype=np.uint64)
    return s, d, src, dst


@pytest.mark.parametrize("op", ["quantize", "dequantize"])
def test_bad_arguments_say_what_was_expected(op):
    fn = getattr(NATIVE, op)
    s, d, _src, _dst = _pointers(2)
    with pytest.raises(ValueError, match=r"expected codec_id 1 \(fp8\) or 2 \(int8\), got 7"):
        fn(7, 3, 1, 2, 1, 4, s, d)
    with pytest.raises(ValueError, match=r"expected codec_id .* got 0"):
        fn(0, 3, 1, 2, 1, 4, s, d)
    with pytest.raises(ValueError, match=r"expected dtype_id 1 \(float16\), 2 \(bfloat16\) or 3 \(float32\), got 4"):
        fn(1, 4, 1, 2, 1, 4, s, d)
    for i, name in enumerate(["L", "T", "H", "D"]):
        dims = [1, 2, 1, 4]
        dims[i] = 0 if i % 2 else -3
        with pytest.raises(ValueError, match=rf"expected a positive {name} .*got {dims[i]}"):
            fn(1, 3, *dims, s, d)
    with pytest.raises(ValueError, match=r"expected src_ptrs and dst_ptrs of equal length, got 2 and 1"):
        fn(1, 3, 1, 2, 1, 4, s, d[:1])
    with pytest.raises(ValueError, match=r"expected dst_ptrs of dtype uint64, got int64"):
        fn(1, 3, 1, 2, 1, 4, s, d.astype(np.int64))
    with pytest.raises(ValueError, match=r"expected src_ptrs as a 1-D uint64 array, got 2 dimensions"):
        fn(1, 3, 1, 2, 1, 4, s.reshape(1, 2), d)
    with pytest.raises(ValueError, match=r"expected non-null pointers in src_ptrs, got 0 at index 1"):
        fn(1, 3, 1, 2, 1, 4, np.array([s[0], 0], dtype=np.uint64), d)
    fn(1, 3, 1, 2, 1, 4, s[:0], d[:0])  # nothing to do is fine


def test_all_finite_and_isa_arguments():
    with pytest.raises(ValueError, match=r"expected dtype_id .* got 9"):
        NATIVE.all_finite(9, 1, 1)
    with pytest.raises(ValueError, match=r"expected numel >= 0, got -1"):
        NATIVE.all_finite(1, 1, -1)
    with pytest.raises(ValueError, match=r"expected a non-null ptr"):
        NATIVE.all_finite(1, 0, 3)
    before = NATIVE.cpu_isa()
    assert before in ALL_ISAS and before == ISAS[-1]  # the best the CPU has is the default
    with pytest.raises(ValueError, match=r"expected an ISA name 'avx512', 'avx2' or 'scalar', got 'sse9'"):
        NATIVE.set_cpu_isa("sse9")
    for missing in set(ALL_ISAS) - set(ISAS):
        with pytest.raises(ValueError, match=rf"expected an ISA this CPU supports .*got '{missing}'"):
            NATIVE.set_cpu_isa(missing)
    assert NATIVE.cpu_isa() == before
