"""The CUDA codec kernels (tierkv._C_cuda) against the torch reference, bit for bit.

Without a GPU (CI) this checks what can be checked on the host: the module imports when it was built, says why it
cannot run, is not used (``ops.cuda()`` is None), validates its arguments, and its fp8 e4m3fn conversion (the very
function the kernels run, compiled for the host too) agrees with torch's on every interesting float32.
With a GPU (tests marked ``gpu``) the kernels run through the public codec and the store and must produce the same
bytes as the torch reference on the CPU (and the CPU kernels when those are built).
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import tierkv
from tierkv import ops
from tierkv.codec import make_codec, reference
from tierkv.codec.format import CODEC_IDS, EncodedFormat

from conftest import assert_bit_equal


def _cuda_module():
    try:
        return importlib.import_module("tierkv._C_cuda")
    except ImportError as exc:
        pytest.skip(f"tierkv._C_cuda not built (no nvcc at build time, or TIERKV_CUDA=OFF): {exc}")


def kernels_usable() -> bool:
    return torch.cuda.is_available() and ops.cuda() is not None


def gpu(test):
    """Needs a CUDA device and the built, usable kernels (``-m gpu`` selects these tests)."""
    return pytest.mark.gpu(pytest.mark.skipif(not kernels_usable(),
                                              reason=f"needs a CUDA device and the CUDA kernels: {ops.cuda_status()}"
                                              if not ops.force_reference() else "TIERKV_FORCE_REFERENCE is set")(test))


# -- host-side checks (run in CI) -------------------------------------------------------------------------------
LAYOUTS = [(1, 1, 1, 1), (2, 4, 2, 16), (3, 5, 3, 7), (32, 16, 8, 128), (2, 3, 4, 256)]


@pytest.mark.parametrize("codec", ["fp8", "int8"])
@pytest.mark.parametrize("dims", LAYOUTS)
def test_module_sizes_agree_with_the_format(codec, dims):
    module = _cuda_module()
    L, T, H, D = dims
    layout = tierkv.KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16)
    assert module.encoded_nbytes(CODEC_IDS[codec], L, T, H, D) == EncodedFormat(codec, layout).nbytes
    assert "90" in module.build_info() and "fmad=false" in module.build_info()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_the_kernels_say_why_and_are_not_used():
    module = _cuda_module()
    reason = module.unusable_reason()
    assert isinstance(reason, str) and reason
    if not ops.force_reference():
        assert ops.cuda() is None
        status = ops.cuda_status()
        assert status.startswith("reference") and reason in status and "unusable" in status


def test_bad_arguments_are_value_errors_naming_what_was_expected():
    module = _cuda_module()
    good = dict(codec_id=1, dtype_id=2, L=2, T=4, H=2, D=16, table_ptr=4096, n=1, stream=0)
    cases = [
        (dict(codec_id=3), "expected codec_id 1 (fp8) or 2 (int8), got 3"),
        (dict(codec_id=0), "got 0"),
        (dict(dtype_id=7), "expected dtype_id 1 (float16), 2 (bfloat16) or 3 (float32), got 7"),
        (dict(D=0), "expected block dimensions"),
        (dict(n=-1), "expected n >= 0 blocks, got -1"),
        (dict(table_ptr=0), "expected table_ptr"),
        (dict(table_ptr=4097), "8-byte aligned"),
        (dict(T=1 << 20, H=1 << 10, D=1 << 10), "values per layer slab"),
    ]
    for op in (module.quantize, module.dequantize):
        for change, message in cases:
            with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
                op(**{**good, **change})
        op(**{**good, "n": 0, "table_ptr": 0})  # nothing to do: no pointer is looked at
    with pytest.raises(ValueError, match="expected codec_id"):
        module.encoded_nbytes(5, 1, 1, 1, 1)


def _fp8_probe_values() -> np.ndarray:
    """float32 values that exercise every branch of a float32 -> e4m3fn conversion."""
    codes = np.arange(256, dtype=np.uint8)
    exact = torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    exact = np.unique(exact[np.isfinite(exact) & (exact >= 0)])            # 0 .. 448, subnormals included
    mids = (exact[:-1].astype(np.float64) + exact[1:]) / 2                  # ties: exactly representable in f32
    mids = mids.astype(np.float32)
    assert np.all(mids.astype(np.float64) == (exact[:-1].astype(np.float64) + exact[1:]) / 2)
    around = np.concatenate([exact, mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e9)),
                             np.nextafter(exact, np.float32(0)), np.nextafter(exact, np.float32(1e9))])
    rng = np.random.default_rng(0)
    log_uniform = np.exp2(rng.uniform(-140, 9, 200_000)).astype(np.float32)  # f32 denormals .. 512
    bits = rng.integers(0, 0x43E00001, 100_000, dtype=np.uint32).view(np.float32)  # every pattern up to 448
    specials = np.array([0.0, 2.0**-149, 2.0**-126, 2.0**-10, 2.0**-9, 2.0**-6, 448.0, 449.0, 464.0,
                         np.nextafter(np.float32(464), np.float32(0)), 2.0**-10 * 3], dtype=np.float32)
    values = np.concatenate([around, log_uniform, bits, specials]).astype(np.float32)
    values = values[values <= 464]  # where the format is defined (the codec clamps to 448 first)
    return np.concatenate([values, -values])


def test_fp8_conversion_of_the_kernels_matches_torch_on_the_host():
    module = _cuda_module()
    x = _fp8_probe_values()
    got = module.encode_fp8_host(x)
    expected = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    bad = np.nonzero(got != expected)[0]
    assert bad.size == 0, (f"{bad.size} of {x.size} conversions differ, e.g. {x[bad[:5]].tolist()} -> "
                           f"{got[bad[:5]].tolist()}, torch {expected[bad[:5]].tolist()}")


def test_fp8_conversion_beyond_448_saturates():
    # The codec clamps to 448 before converting, so this is outside the format; it saturates like torch's CUDA
    # conversion (satfinite) and torch 2.13's CPU one, and NaN stays NaN.
    module = _cuda_module()
    x = np.array([448.5, 464.5, 470.0, 479.9, 480.0, 1e6, 3e38, np.inf], dtype=np.float32)
    got = module.encode_fp8_host(np.concatenate([x, -x, [np.nan]]).astype(np.float32))
    assert got.tolist() == [0x7E] * len(x) + [0xFE] * len(x) + [0x7F]


def test_fp8_decode_of_the_kernels_matches_torch_for_every_code():
    module = _cuda_module()
    codes = np.arange(256, dtype=np.uint8)
    got = module.decode_fp8_host(codes)
    expected = torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert np.array_equal(got[finite].view(np.uint32), expected[finite].view(np.uint32))  # -0.0 included


# -- GPU: kernels vs reference ----------------------------------------------------------------------------------
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [  # (n blocks, layers, tokens, heads, head_dim)
    (1, 1, 1, 1, 1),
    (3, 2, 4, 2, 16),
    (5, 3, 5, 3, 7),        # odd everything: one-value-at-a-time paths, encoded rows at odd addresses
    (2, 2, 16, 8, 128),     # a Llama-like layer slab
    (2, 2, 3, 5, 256),      # head_dim wider than a warp's vectors
    (4, 1, 7, 3, 24),       # D % 8 == 0 but rows of 3 vectors
    (300, 1, 2, 1, 8),      # many blocks per launch
]


def _layout(L, T, H, D, dtype) -> tierkv.KVLayout:
    return tierkv.KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=D, dtype=dtype)


def _tiny(dtype: torch.dtype) -> float:
    return {torch.float16: 2.0**-20, torch.bfloat16: 2.0**-130, torch.float32: 2.0**-140}[dtype]


def make_kv(n: int, layout: tierkv.KVLayout, seed: int) -> torch.Tensor:
    """Blocks with what real caches and corner cases have: outlier channels, huge values, zeros, subnormals."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *layout.block_shape)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    x *= torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=g).float())   # per-row magnitudes
    x[..., 0, :, :, ::5] *= 40.0                                                  # K outlier channels
    flat = x.view(-1)
    k = max(1, flat.numel() // 50)
    idx = torch.randint(0, flat.numel(), (k,), generator=g)
    flat[idx[: k // 3]] = 0.0
    flat[idx[k // 3: 2 * k // 3]] = 1000.0 * torch.sign(torch.randn(len(idx[k // 3: 2 * k // 3]), generator=g))
    flat[idx[2 * k // 3:]] = _tiny(layout.dtype) * torch.randint(-3, 4, (len(idx[2 * k // 3:]),),
                                                                    generator=g).float()
    if n > 1:
        x[1, 0, 1] = 0.0                                   # an all-zero V slab: scale floor
        x[1, 0, 0, :, 0] = _tiny(layout.dtype)             # a group of subnormals only
    return x.to(layout.dtype)


def _encode_reference(blocks: torch.Tensor, codec) -> torch.Tensor:
    out = torch.empty((blocks.shape[0], codec.nbytes), dtype=torch.uint8)
    reference.encode(blocks.cpu(), codec.format, out)
    return out


def _decode_reference(encoded: torch.Tensor, codec) -> torch.Tensor:
    out = torch.empty((encoded.shape[0], *codec.layout.block_shape), dtype=codec.layout.dtype)
    reference.decode(encoded.cpu(), codec.format, out)
    return out


@gpu
@pytest.mark.parametrize("codec_name", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_the_reference_bit_for_bit(codec_name, dtype, shape):
    n, L, T, H, D = shape
    layout = _layout(L, T, H, D, dtype)
    codec = make_codec(codec_name, layout)
    blocks = make_kv(n, layout, seed=n * 1000 + L * 100 + D)
    expected = _encode_reference(blocks, codec)

    got = torch.empty((n, codec.nbytes), dtype=torch.uint8, device="cuda")
    codec.encode(blocks.cuda(), got)
    assert_bit_equal(got, expected, f"{codec_name} encode on the GPU")

    # The torch reference run on the GPU agrees too (it is the same specification).
    on_gpu = torch.empty_like(got)
    reference.encode(blocks.cuda(), codec.format, on_gpu)
    assert_bit_equal(on_gpu, expected, "torch reference on the GPU")

    # The CPU kernels, when built, are the third implementation of the same bits.
    cpu = torch.empty_like(expected)
    codec.encode(blocks, cpu)
    assert_bit_equal(cpu, expected, f"{codec_name} encode on the CPU ({ops.native_status()})")

    decoded = torch.empty((n, *layout.block_shape), dtype=dtype, device="cuda")
    codec.decode(got, decoded)
    assert_bit_equal(decoded, _decode_reference(expected, codec), f"{codec_name} decode on the GPU")


@gpu
@pytest.mark.parametrize("codec_name", ["fp8", "int8"])
def test_random_shapes(codec_name):
    g = torch.Generator().manual_seed(7)
    for trial in range(12):
        L, T, H = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
        D = int(torch.randint(1, 160, (1,), generator=g))
        n = int(torch.randint(1, 9, (1,), generator=g))
        dtype = DTYPES[trial % 3]
        layout = _layout(L, T, H, D, dtype)
        codec = make_codec(codec_name, layout)
        blocks = make_kv(n, layout, seed=trial)
        got = torch.empty((n, codec.nbytes), dtype=torch.uint8, device="cuda")
        codec.encode(blocks.cuda(), got)
        expected = _encode_reference(blocks, codec)
        assert_bit_equal(got, expected, f"{codec_name} {layout}")
        back = torch.empty((n, *layout.block_shape), dtype=dtype, device="cuda")
        codec.decode(got, back)
        assert_bit_equal(back, _decode_reference(expected, codec), f"{codec_name} decode {layout}")


@gpu
@pytest.mark.parametrize("codec_name", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_misaligned_tensors(codec_name, dtype):
    layout = _layout(2, 4, 2, 16, dtype)
    codec = make_codec(codec_name, layout)
    n = 3
    blocks = make_kv(n, layout, seed=3)
    expected = _encode_reference(blocks, codec)
    dev = blocks.cuda()

    # A strided view (every other head_dim column of a wider tensor) and a view 2 bytes off alignment.
    wide = torch.zeros((n, *layout.block_shape[:-1], 2 * layout.head_dim), dtype=dtype, device="cuda")
    wide[..., ::2] = dev
    flat = torch.zeros(dev.numel() + 1, dtype=dtype, device="cuda")
    flat[1:] = dev.reshape(-1)
    # Encoded rows at odd addresses: row stride nbytes + 1, and an offset of 1.
    rows = torch.full((n, codec.nbytes + 3), 0xAB, dtype=torch.uint8, device="cuda")[:, 1:codec.nbytes + 1]
    for src in (wide[..., ::2], flat[1:].view(dev.shape), dev.transpose(3, 4).contiguous().transpose(3, 4)):
        rows.fill_(0xAB)
        codec.encode(src, rows)
        assert_bit_equal(rows, expected, f"{codec_name} encode of a {tuple(src.stride())}-strided view")

    want = _decode_reference(expected, codec)
    out_wide = torch.zeros_like(wide)
    codec.decode(rows, out_wide[..., ::2])
    assert_bit_equal(out_wide[..., ::2], want, "decode into a strided view")
    out_flat = torch.zeros_like(flat)
    codec.decode(rows, out_flat[1:].view(dev.shape))
    assert_bit_equal(out_flat[1:].view(dev.shape), want, "decode from odd rows into a misaligned view")


@gpu
@pytest.mark.parametrize("codec_name", ["fp8", "int8"])
def test_side_stream(codec_name):
    layout = _layout(4, 16, 8, 128, torch.bfloat16)
    codec = make_codec(codec_name, layout)
    blocks = make_kv(6, layout, seed=11)
    expected = _encode_reference(blocks, codec)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        src = blocks.to("cuda", non_blocking=True)
        got = torch.empty((6, codec.nbytes), dtype=torch.uint8, device="cuda")
        codec.encode(src, got)
        back = torch.empty_like(src)
        codec.decode(got, back)
        got_host = got.to("cpu")
        back_host = back.to("cpu")
    side.synchronize()
    assert_bit_equal(got_host, expected, "encode on a side stream")
    assert_bit_equal(back_host, _decode_reference(expected, codec), "decode on a side stream")


@gpu
def test_a_host_pointer_table_is_refused():
    module = ops.cuda()
    table = torch.zeros((2, 1), dtype=torch.int64, pin_memory=True)
    with pytest.raises(ValueError, match="expected table_ptr to point to device memory"):
        module.quantize(1, 2, 1, 1, 1, 8, table.data_ptr(), 1, torch.cuda.current_stream().cuda_stream)


@gpu
def test_many_launches_reuse_pinned_tables_safely():
    # Tables are freed right after each launch; their memory must not be reused before the GPU has read it.
    layout = _layout(2, 4, 2, 16, torch.bfloat16)
    codec = make_codec("fp8", layout)
    blocks = make_kv(64, layout, seed=5)
    expected = _encode_reference(blocks, codec)
    dev = blocks.cuda()
    out = torch.empty((64, codec.nbytes), dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(50_000_000)  # keep the stream busy so the uploads queue up behind it
    for i in range(64):
        codec.encode(dev[i:i + 1], out[i:i + 1])
    assert_bit_equal(out, expected, "64 queued single-block launches")


@gpu
@pytest.mark.parametrize("codec_name", ["fp8", "int8"])
def test_store_demotes_through_the_gpu_codec(codec_name):
    layout = _layout(2, 4, 2, 16, torch.bfloat16)
    codec = make_codec(codec_name, layout)
    n = 4
    config = tierkv.StoreConfig(device_bytes=n * layout.block_nbytes, host_bytes=64 * codec.nbytes,
                                host_codec=codec_name)
    first, second = make_kv(n, layout, seed=21), make_kv(n, layout, seed=22)
    keys = tierkv.block_keys(list(range(2 * n * layout.block_tokens)), block_tokens=layout.block_tokens)
    with tierkv.BlockStore(layout, config) as store:
        assert store.device.type == "cuda"
        store.put(keys[:n], first.cuda())
        store.put(keys[n:], second.cuda())     # pushes the first blocks down to the fp8/int8 host tier
        assert dict(store.stats().tiers)["device"].evictions >= n
        got = store.get(keys[:n])
    assert got.device.type == "cuda"
    expected = _decode_reference(_encode_reference(first, codec), codec)
    assert_bit_equal(got, expected, f"blocks back from the {codec_name} host tier")
