// CUDA kernels of the lossy codecs. Format and maths: tierkv/codec/format.py; reference: tierkv/codec/reference.py.
//
// Work split: one thread block per (block, layer, K or V) "slab" [T, H, D], which is contiguous in the source
// block and in the encoded values. Every scale group lies inside one slab, so a thread block finds its groups'
// amax, writes their scales and quantizes with no communication beyond its own warps:
//   fp8        one group per head (T x D values):      a warp per head, shuffle reduction, then a second pass
//   int8 K     one group per channel (h, d) over T:     a thread per 8 adjacent channels, no reduction at all
//   int8 V     one group per (t, h) row of D values:   a sub-warp per row, shuffle reduction
// The second pass re-reads the slab (a few tens of KiB) from L1/L2, so HBM sees each source byte about once.
// Rows are read and written 16 / 8 bytes at a time when D % 8 == 0 and the pointers allow it, else one value at a
// time (odd head_dim, or encoded rows at odd addresses). Arithmetic is float32 with explicit round-to-nearest
// intrinsics; the build also passes --fmad=false so nothing is contracted into an FMA.
#include "codec_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace tierkv::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <int DT>
struct Elem;
template <>
struct Elem<kDtypeF16> {
    using T = __half;
    static __device__ __forceinline__ float to_float(T v) { return __half2float(v); }
    static __device__ __forceinline__ T from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<kDtypeBF16> {
    using T = __nv_bfloat16;
    static __device__ __forceinline__ float to_float(T v) { return __bfloat162float(v); }
    static __device__ __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Elem<kDtypeF32> {
    using T = float;
    static __device__ __forceinline__ float to_float(T v) { return v; }
    static __device__ __forceinline__ T from_float(float v) { return v; }
};

template <int CODEC>
struct Codec;
template <>
struct Codec<kCodecFp8> {
    static constexpr float qmax = 448.0f;
    static __device__ __forceinline__ uint8_t encode(float y) { return fp8_e4m3_from_float(y); }
    static __device__ __forceinline__ float decode(uint8_t q) { return fp8_e4m3_to_float(q); }
};
template <>
struct Codec<kCodecInt8> {
    static constexpr float qmax = 127.0f;
    static __device__ __forceinline__ uint8_t encode(float y) {
        return static_cast<uint8_t>(static_cast<int8_t>(round_half_even(y)));
    }
    static __device__ __forceinline__ float decode(uint8_t q) {
        return static_cast<float>(static_cast<int8_t>(q));
    }
};

// ---- memory helpers -------------------------------------------------------------------------------------------
template <typename E>
__device__ __forceinline__ void load8(const typename E::T* p, float (&v)[8]) {
    using T = typename E::T;
    if constexpr (sizeof(T) == 2) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = E::to_float(e[i]);
    } else {
        const float4 a = __ldg(reinterpret_cast<const float4*>(p));
        const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
}

template <typename E>
__device__ __forceinline__ void store8(typename E::T* p, const float (&v)[8]) {
    using T = typename E::T;
    if constexpr (sizeof(T) == 2) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = E::from_float(v[i]);
        *reinterpret_cast<uint4*>(p) = raw;
    } else {
        reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

__device__ __forceinline__ void store_bytes8(uint8_t* p, const uint8_t (&q)[8]) {
    const uint32_t lo = q[0] | (q[1] << 8) | (q[2] << 16) | (static_cast<uint32_t>(q[3]) << 24);
    const uint32_t hi = q[4] | (q[5] << 8) | (q[6] << 16) | (static_cast<uint32_t>(q[7]) << 24);
    *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
}

__device__ __forceinline__ void load_bytes8(const uint8_t* p, uint8_t (&q)[8]) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        q[i] = static_cast<uint8_t>(raw.x >> (8 * i));
        q[4 + i] = static_cast<uint8_t>(raw.y >> (8 * i));
    }
}

// Scales are float32 little-endian at byte offsets that are 4-aligned only when the encoded row is.
__device__ __forceinline__ void store_f32(uint8_t* p, float v, bool aligned) {
    if (aligned) {
        *reinterpret_cast<float*>(p) = v;
        return;
    }
    const uint32_t u = float_bits(v);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(u >> (8 * i));
}

__device__ __forceinline__ float load_f32(const uint8_t* p, bool aligned) {
    if (aligned) return __ldg(reinterpret_cast<const float*>(p));
    uint32_t u = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) u |= static_cast<uint32_t>(p[i]) << (8 * i);
    return bits_float(u);
}

__device__ __forceinline__ float warp_max(float v, int width) {
    for (int o = width / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <int CODEC>
__device__ __forceinline__ void scale_and_inverse(float amax, float& scale, float& inv) {
    scale = fmaxf(__fdiv_rn(amax, Codec<CODEC>::qmax), kScaleFloor);
    inv = __fdiv_rn(1.0f, scale);
}

template <int CODEC>
__device__ __forceinline__ uint8_t quantize_one(float x, float inv) {
    constexpr float q = Codec<CODEC>::qmax;
    return Codec<CODEC>::encode(fminf(fmaxf(__fmul_rn(x, inv), -q), q));
}

// Where one thread block works: block b, layer l, K (kv = 0) or V (kv = 1).
struct Slab {
    int64_t b;
    int l, kv;
    int T, H, D;
    int64_t elems;  // T * H * D
};

__device__ __forceinline__ Slab slab_of(const Geometry& g) {
    Slab s;
    const int64_t id = blockIdx.x;
    s.kv = static_cast<int>(id % 2);
    s.l = static_cast<int>((id / 2) % g.L);
    s.b = id / (2 * g.L);
    s.T = static_cast<int>(g.T);
    s.H = static_cast<int>(g.H);
    s.D = static_cast<int>(g.D);
    s.elems = g.T * g.H * g.D;
    return s;
}

// ---- quantize -------------------------------------------------------------------------------------------------
// fp8: one scale per head over the slab's T x D values. Scales stored [L, 2, H].
// Quantizes the 8 values (VEC) or the one value at `off` of a slab with one inverse scale.
template <int CODEC, typename E, bool VEC>
__device__ __forceinline__ void quantize_unit(const typename E::T* src, uint8_t* vals, int off, float inv) {
    if constexpr (VEC) {
        float v[8];
        uint8_t q[8];
        load8<E>(src + off, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = quantize_one<CODEC>(v[i], inv);
        store_bytes8(vals + off, q);
    } else {
        vals[off] = quantize_one<CODEC>(E::to_float(src[off]), inv);
    }
}

template <typename E, bool VEC>
__device__ void quantize_fp8(const typename E::T* src, uint8_t* vals, uint8_t* scales, bool scales_aligned,
                             const Slab& s) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row_vecs = VEC ? s.D / 8 : s.D;  // units per row: 8-value vectors or single values
    const int units = s.T * row_vecs;
    for (int h = warp; h < s.H; h += kWarps) {
        float amax = 0.0f;
#pragma unroll 4
        for (int u = lane; u < units; u += 32) {
            const int t = u / row_vecs;
            const int off = (t * s.H + h) * s.D + (u - t * row_vecs) * (VEC ? 8 : 1);
            if constexpr (VEC) {
                float v[8];
                load8<E>(src + off, v);
#pragma unroll
                for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
            } else {
                amax = fmaxf(amax, fabsf(E::to_float(src[off])));
            }
        }
        amax = warp_max(amax, 32);
        float scale, inv;
        scale_and_inverse<kCodecFp8>(amax, scale, inv);
        if (lane == 0) store_f32(scales + 4 * h, scale, scales_aligned);
#pragma unroll 4
        for (int u = lane; u < units; u += 32) {
            const int t = u / row_vecs;
            const int off = (t * s.H + h) * s.D + (u - t * row_vecs) * (VEC ? 8 : 1);
            quantize_unit<kCodecFp8, E, VEC>(src, vals, off, inv);
        }
    }
}

// int8 K: one scale per channel (h, d) over the slab's T tokens. A thread owns 8 adjacent channels (VEC) or one,
// keeps their amax in registers and needs no reduction. Scales stored [L, H, D] (this slab: H * D of them).
template <typename E, bool VEC>
__device__ void quantize_int8_k(const typename E::T* src, uint8_t* vals, uint8_t* scales, bool scales_aligned,
                                const Slab& s) {
    constexpr int W = VEC ? 8 : 1;
    const int channels = s.H * s.D;
    for (int j = threadIdx.x * W; j < channels; j += kThreads * W) {
        float amax[W], inv[W];
#pragma unroll
        for (int i = 0; i < W; ++i) amax[i] = 0.0f;
#pragma unroll 4
        for (int t = 0; t < s.T; ++t) {
            const int off = t * channels + j;
            if constexpr (VEC) {
                float v[8];
                load8<E>(src + off, v);
#pragma unroll
                for (int i = 0; i < 8; ++i) amax[i] = fmaxf(amax[i], fabsf(v[i]));
            } else {
                amax[0] = fmaxf(amax[0], fabsf(E::to_float(src[off])));
            }
        }
#pragma unroll
        for (int i = 0; i < W; ++i) {
            float scale;
            scale_and_inverse<kCodecInt8>(amax[i], scale, inv[i]);
            store_f32(scales + 4 * (j + i), scale, scales_aligned);
        }
#pragma unroll 4
        for (int t = 0; t < s.T; ++t) {
            const int off = t * channels + j;
            if constexpr (VEC) {
                float v[8];
                uint8_t q[8];
                load8<E>(src + off, v);
#pragma unroll
                for (int i = 0; i < 8; ++i) q[i] = quantize_one<kCodecInt8>(v[i], inv[i]);
                store_bytes8(vals + off, q);
            } else {
                vals[off] = quantize_one<kCodecInt8>(E::to_float(src[off]), inv[0]);
            }
        }
    }
}

// int8 V: one scale per (t, h) row over its D values. A sub-warp of `width` lanes (a power of two) per row, so a
// warp covers 32 / width rows at once; lanes past the last row still join the shuffles. Scales stored [L, T, H].
template <typename E, bool VEC>
__device__ void quantize_int8_v(const typename E::T* src, uint8_t* vals, uint8_t* scales, bool scales_aligned,
                                const Slab& s) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row_units = VEC ? s.D / 8 : s.D;
    int width = 1;
    while (width < row_units && width < 32) width *= 2;
    const int rows_per_warp = 32 / width;
    const int sub = lane / width, sl = lane % width;
    const int rows = s.T * s.H;
    for (int base = warp * rows_per_warp; base < rows; base += kWarps * rows_per_warp) {
        const int r = base + sub;
        const bool active = r < rows;
        float amax = 0.0f;
        if (active) {
#pragma unroll 4
    #pragma unroll 4
        for (int u = sl; u < row_units; u += width) {
                const int off = r * s.D + u * (VEC ? 8 : 1);
                if constexpr (VEC) {
                    float v[8];
                    load8<E>(src + off, v);
#pragma unroll
                    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
                } else {
                    amax = fmaxf(amax, fabsf(E::to_float(src[off])));
                }
            }
        }
        amax = warp_max(amax, width);
        if (!active) continue;
        float scale, inv;
        scale_and_inverse<kCodecInt8>(amax, scale, inv);
        if (sl == 0) store_f32(scales + 4 * r, scale, scales_aligned);
#pragma unroll 4
        for (int u = sl; u < row_units; u += width) {
            const int off = r * s.D + u * (VEC ? 8 : 1);
            quantize_unit<kCodecInt8, E, VEC>(src, vals, off, inv);
        }
    }
}

template <int CODEC, int DT>
__global__ void __launch_bounds__(kThreads) quantize_kernel(Geometry g, const int64_t* __restrict__ table,
                                                            int64_t n) {
    using E = Elem<DT>;
    using T = typename E::T;
    const Slab s = slab_of(g);
    const auto* block = reinterpret_cast<const T*>(__ldg(table + s.b));
    auto* row = reinterpret_cast<uint8_t*>(__ldg(table + n + s.b));
    const int64_t slab_index = 2 * s.l + s.kv;
    const T* src = block + slab_index * s.elems;
    uint8_t* vals = row + g.values_offset() + slab_index * s.elems;
    const bool scales_aligned = (reinterpret_cast<uintptr_t>(row) & 3u) == 0;
    const bool vec = s.D % 8 == 0 && (reinterpret_cast<uintptr_t>(block) & 15u) == 0 &&
                     (reinterpret_cast<uintptr_t>(row) & 7u) == 0;

    if (slab_index == 0) {  // header and the zero padding before the values, once per row
        const int64_t scale_end = kHeaderBytes + 4 * g.n_scales();
        for (int64_t i = scale_end + threadIdx.x; i < g.values_offset(); i += kThreads) row[i] = 0;
        if (threadIdx.x < kHeaderBytes) {
            const uint32_t ns = static_cast<uint32_t>(g.n_scales());
            const int i = threadIdx.x;
            uint8_t v = 0;
            if (i == 0) v = kFormatVersion;
            else if (i == 1) v = static_cast<uint8_t>(CODEC);
            else if (i == 2) v = static_cast<uint8_t>(DT);
            else if (i >= 4 && i < 8) v = static_cast<uint8_t>(ns >> (8 * (i - 4)));
            row[i] = v;
        }
    }

    uint8_t* scales = row + kHeaderBytes;
    if constexpr (CODEC == kCodecFp8) {
        scales += 4 * slab_index * s.H;
        if (vec) quantize_fp8<E, true>(src, vals, scales, scales_aligned, s);
        else quantize_fp8<E, false>(src, vals, scales, scales_aligned, s);
    } else if (s.kv == 0) {
        scales += 4 * static_cast<int64_t>(s.l) * s.H * s.D;
        if (vec) quantize_int8_k<E, true>(src, vals, scales, scales_aligned, s);
        else quantize_int8_k<E, false>(src, vals, scales, scales_aligned, s);
    } else {
        scales += 4 * (g.L * g.H * g.D + static_cast<int64_t>(s.l) * s.T * s.H);
        if (vec) quantize_int8_v<E, true>(src, vals, scales, scales_aligned, s);
        else quantize_int8_v<E, false>(src, vals, scales, scales_aligned, s);
    }
}

// ---- dequantize -----------------------------------------------------------------------------------------------
// Linear over the slab: every value's scale is one load (cached in L1: a slab has few scales).
template <int CODEC>
__device__ __forceinline__ int64_t scale_index(const Geometry& g, const Slab& s, int i) {
    const int row = i / s.D;  // (t, h) row within the slab
    if constexpr (CODEC == kCodecFp8) return (2 * s.l + s.kv) * g.H + row % s.H;
    if (s.kv == 0) return static_cast<int64_t>(s.l) * s.H * s.D + i % (s.H * s.D);
    return g.L * g.H * g.D + static_cast<int64_t>(s.l) * s.T * s.H + row;
}

template <int CODEC, int DT>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(Geometry g, const int64_t* __restrict__ table,
                                                              int64_t n) {
    using E = Elem<DT>;
    using T = typename E::T;
    const Slab s = slab_of(g);
    const auto* row = reinterpret_cast<const uint8_t*>(__ldg(table + s.b));
    auto* block = reinterpret_cast<T*>(__ldg(table + n + s.b));
    const int64_t slab_index = 2 * s.l + s.kv;
    const uint8_t* vals = row + g.values_offset() + slab_index * s.elems;
    const uint8_t* scales = row + kHeaderBytes;
    T* dst = block + slab_index * s.elems;
    const bool scales_aligned = (reinterpret_cast<uintptr_t>(row) & 3u) == 0;
    const bool vec = s.D % 8 == 0 && (reinterpret_cast<uintptr_t>(block) & 15u) == 0 &&
                     (reinterpret_cast<uintptr_t>(row) & 7u) == 0;
    const int elems = static_cast<int>(s.elems);
    if (vec) {
#pragma unroll 4
        for (int i = threadIdx.x * 8; i < elems; i += kThreads * 8) {
            uint8_t q[8];
            float y[8];
            load_bytes8(vals + i, q);
            if (CODEC == kCodecInt8 && s.kv == 0) {  // eight channels, eight scales
                const int64_t k0 = scale_index<CODEC>(g, s, i);
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    y[j] = __fmul_rn(Codec<CODEC>::decode(q[j]), load_f32(scales + 4 * (k0 + j), scales_aligned));
            } else {  // the eight values share a row, hence a scale
                const float sc = load_f32(scales + 4 * scale_index<CODEC>(g, s, i), scales_aligned);
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = __fmul_rn(Codec<CODEC>::decode(q[j]), sc);
            }
            store8<E>(dst + i, y);
        }
    } else {
        for (int i = threadIdx.x; i < elems; i += kThreads) {
            const float sc = load_f32(scales + 4 * scale_index<CODEC>(g, s, i), scales_aligned);
            dst[i] = E::from_float(__fmul_rn(Codec<CODEC>::decode(vals[i]), sc));
        }
    }
}

template <int CODEC, int DT>
void launch_q(const Geometry& g, const int64_t* table, int64_t n, cudaStream_t stream) {
    quantize_kernel<CODEC, DT><<<static_cast<unsigned>(n * 2 * g.L), kThreads, 0, stream>>>(g, table, n);
}

template <int CODEC, int DT>
void launch_d(const Geometry& g, const int64_t* table, int64_t n, cudaStream_t stream) {
    dequantize_kernel<CODEC, DT><<<static_cast<unsigned>(n * 2 * g.L), kThreads, 0, stream>>>(g, table, n);
}

template <bool QUANT>
cudaError_t launch(const Geometry& g, const int64_t* table, int64_t n, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    cudaGetLastError();  // a stale error from unrelated work must not be reported as ours
#define TIERKV_CASE(C, D)                                                        \
    if (g.codec == C && g.dtype == D) {                                          \
        if (QUANT) launch_q<C, D>(g, table, n, stream);                          \
        else launch_d<C, D>(g, table, n, stream);                                \
        return cudaGetLastError();                                               \
    }
    TIERKV_CASE(kCodecFp8, kDtypeF16)
    TIERKV_CASE(kCodecFp8, kDtypeBF16)
    TIERKV_CASE(kCodecFp8, kDtypeF32)
    TIERKV_CASE(kCodecInt8, kDtypeF16)
    TIERKV_CASE(kCodecInt8, kDtypeBF16)
    TIERKV_CASE(kCodecInt8, kDtypeF32)
#undef TIERKV_CASE
    return cudaErrorInvalidValue;  // the module validates codec and dtype before calling
}

}  // namespace

cudaError_t launch_quantize(const Geometry& g, const int64_t* table, int64_t n, cudaStream_t stream) {
    return launch<true>(g, table, n, stream);
}

cudaError_t launch_dequantize(const Geometry& g, const int64_t* table, int64_t n, cudaStream_t stream) {
    return launch<false>(g, table, n, stream);
}

cudaError_t kernel_image_status() {
    cudaFuncAttributes attr;
    const cudaError_t err = cudaFuncGetAttributes(&attr, quantize_kernel<kCodecFp8, kDtypeBF16>);
    if (err != cudaSuccess) cudaGetLastError();
    return err;
}

const char* nvcc_version() {
#define TIERKV_STR2(x) #x
#define TIERKV_STR(x) TIERKV_STR2(x)
    return TIERKV_STR(__CUDACC_VER_MAJOR__) "." TIERKV_STR(__CUDACC_VER_MINOR__);
}

}  // namespace tierkv::cuda
