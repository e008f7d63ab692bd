// CPU kernels of the lossy codecs (fp8 e4m3 and int8 with float32 scales). Format: tierkv/codec/format.py.
//
// Exactness: every implementation follows the same float32 steps as the torch reference
// (tierkv/codec/reference.py), so all produce the same bits:
//   scale = max(amax / qmax, 2^-126)       one float32 division (scalar code, here in the driver)
//   inv   = 1.0f / scale                   one float32 division
//   y     = clamp(x * inv, -qmax, qmax)    float32 multiply (the build passes -ffp-contract=off: no FMA)
//   q     = fp8: round-to-nearest-even to e4m3fn (integer bit operations, subnormals included)
//           int8: round half to even, then the (exact) integer cast
//   x'    = float32(q) * scale, rounded to nearest-even in the block's dtype
//
// Layout of the work: a block is [L, 2, T, H, D]; each (layer, K/V) slab is T rows of H*D elements. Every scale
// group is expressed as a per-element row of H*D inverses (or scales), so the vector kernels only ever see
// "rows of n elements times a row of n factors" and vector tails occur once per row.
//
// ISAs: the scalar kernels are the reference and the fallback; AVX2 (+F16C) and AVX-512 (F/BW/VL) versions are
// compiled with function-level target attributes and chosen at run time with __builtin_cpu_supports, never with
// -march=native, so one build runs on any x86-64.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns inside avx512fintrin.h (its _mm512_undefined_* helpers): a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define TIERKV_X86 1
#else
#define TIERKV_X86 0
#endif

#include "bindings.h"

namespace nb = nanobind;

namespace tierkv {
namespace {

enum DtypeId : int { kF16 = 1, kBF16 = 2, kF32 = 3 };
enum CodecId : int { kFP8 = 1, kINT8 = 2 };
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr size_t kHeaderBytes = 16;
constexpr size_t kValuesAlignment = 64;
constexpr uint8_t kFormatVersion = 1;
constexpr float kScaleFloor = 0x1p-126f;

inline size_t dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }
inline float qmax_of(int codec) { return codec == kFP8 ? 448.0f : 127.0f; }

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---------------------------------------------------------------------------------------------- scalar conversions

// (mant >> s) rounded to nearest, ties to even; s in [1, 31], mant < 2^25.
inline uint32_t shift_rne(uint32_t mant, uint32_t s) {
    return (mant + ((1u << (s - 1)) - 1u) + ((mant >> s) & 1u)) >> s;
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32 (and a normal float32 result)
        const float v = static_cast<float>(man) * 0x1p-24f;
        return float_of(sign | bits_of(v));
    }
    return float_of(sign | ((exp + 112u) << 23) | (man << 13));
}

inline float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Round-to-nearest-even float32 -> float16, with subnormals, overflow to infinity and quiet NaNs (as F16C does).
inline uint16_t f32_to_f16(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (and inf): infinity
    if (a >= 0x38800000u) {                                               // normal half (>= 2^-14)
        const uint32_t r = (a + 0xfffu + ((a >> 13) & 1u)) >> 13;
        return static_cast<uint16_t>(sign | (r - (112u << 10)));
    }
    // subnormal half: value = mant * 2^(E - 150), in units of 2^-24 that is mant >> (126 - E)
    const uint32_t e = a >> 23;
    const uint32_t s = std::min<uint32_t>(126u - e, 31u);
    const uint32_t mant = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
    return static_cast<uint16_t>(sign | shift_rne(mant, s));
}

// Round-to-nearest-even float32 -> bfloat16; NaN becomes 0xffff, as torch's vectorised CPU conversion writes it.
inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// float32 -> fp8 e4m3fn, round to nearest even, for |y| <= 448 (the caller clamps; e4m3fn has no infinity).
inline uint8_t f32_to_e4m3(float y) {
    const uint32_t u = bits_of(y);
    const uint32_t sign = (u >> 24) & 0x80u;
    const uint32_t a = u & 0x7fffffffu;
    uint32_t r;
    if (a >= 0x3c800000u) {  // >= 2^-6, the smallest normal e4m3: keep 3 of 23 mantissa bits, rebias 127 -> 7
        r = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
    } else {  // subnormal e4m3: value = mant * 2^(E - 150), in units of 2^-9 that is mant >> (141 - E)
        const uint32_t e = a >> 23;
        const uint32_t s = std::min<uint32_t>(141u - e, 31u);
        const uint32_t mant = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
        r = shift_rne(mant, s);  // 8 (a carry out of the subnormals) is exactly the smallest normal's code
    }
    return static_cast<uint8_t>(sign | r);
}

// fp8 e4m3fn -> float32 (exact). 0x7f / 0xff are NaN, written as torch writes them (sign | 0x7ff00000).
inline float e4m3_to_f32(uint8_t b) {
    const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
    const uint32_t m7 = b & 0x7fu;
    if (m7 == 0x7f) return float_of(sign | 0x7ff00000u);
    if (m7 < 8) return float_of(sign | bits_of(static_cast<float>(m7) * 0x1p-9f));
    return float_of(sign | ((m7 << 20) + (120u << 23)));
}

inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

template <int DT>
inline float load1(const void* p, size_t i) {
    if constexpr (DT == kF32) {
        float v;
        std::memcpy(&v, static_cast<const char*>(p) + 4 * i, 4);
        return v;
    } else {
        uint16_t h;
        std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
        return DT == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
}

template <int DT>
inline void store1(void* p, size_t i, float v) {
    if constexpr (DT == kF32) {
        std::memcpy(static_cast<char*>(p) + 4 * i, &v, 4);
    } else {
        const uint16_t h = DT == kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
        std::memcpy(static_cast<char*>(p) + 2 * i, &h, 2);
    }
}

template <int CODEC>
inline uint8_t quantize1(float x, float inv) {
    constexpr float q = CODEC == kFP8 ? 448.0f : 127.0f;
    const float y = clampf(x * inv, -q, q);
    if constexpr (CODEC == kFP8) {
        return f32_to_e4m3(y);
    } else {
        return static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(y)));
    }
}

template <int CODEC>
inline float decode1(uint8_t b) {
    if constexpr (CODEC == kFP8) return e4m3_to_f32(b);
    else return static_cast<float>(static_cast<int8_t>(b));
}

// --------------------------------------------------------------------------------------------------- kernel table
// The driver expresses every codec as these four row operations; each ISA supplies them.
struct Kernels {
    // acc[j] = max over the `rows` rows (stride n) of |x[r][j]|, for j < n.
    void (*amax_rows)(const void* src, int dtype, size_t rows, size_t n, float* acc);
    // out[h] = max over d < D of |x[h * D + d]|, for h < H.
    void (*segment_amax)(const void* src, int dtype, size_t H, size_t D, float* out);
    // dst[r][j] = convert(clamp(x[r][j] * inv[j], -qmax, qmax)).
    void (*quantize_rows)(const void* src, int dtype, size_t rows, size_t n, const float* inv, int codec,
                          uint8_t* dst);
    // dst[r][j] = round_to_dtype(float32(q[r][j]) * scale[j]).
    void (*dequantize_rows)(const uint8_t* src, int codec, size_t rows, size_t n, const float* scale, int dtype,
                            void* dst);
    bool (*all_finite)(const void* src, int dtype, size_t numel);
};

// Dispatch a runtime (dtype) to a template argument.
#define TIERKV_DTYPE_SWITCH(dtype, DT, ...)                \
    switch (dtype) {                                       \
        case kF16: { constexpr int DT = kF16; __VA_ARGS__; break; }   \
        case kBF16: { constexpr int DT = kBF16; __VA_ARGS__; break; } \
        default: { constexpr int DT = kF32; __VA_ARGS__; break; }     \
    }
#define TIERKV_CODEC_SWITCH(codec, C, ...)                            \
    if ((codec) == kFP8) { constexpr int C = kFP8; __VA_ARGS__; }     \
    else { constexpr int C = kINT8; __VA_ARGS__; }

// ------------------------------------------------------------------------------------------------------- scalar
namespace scalar {

template <int DT>
void amax_rows_t(const void* src, size_t rows, size_t n, float* acc) {
    for (size_t j = 0; j < n; ++j) acc[j] = 0.0f;
    for (size_t r = 0; r < rows; ++r)
        for (size_t j = 0; j < n; ++j) acc[j] = std::max(acc[j], std::fabs(load1<DT>(src, r * n + j)));
}
void amax_rows(const void* src, int dtype, size_t rows, size_t n, float* acc) {
    TIERKV_DTYPE_SWITCH(dtype, DT, amax_rows_t<DT>(src, rows, n, acc))
}

template <int DT>
void segment_amax_t(const void* src, size_t H, size_t D, float* out) {
    for (size_t h = 0; h < H; ++h) {
        float m = 0.0f;
        for (size_t d = 0; d < D; ++d) m = std::max(m, std::fabs(load1<DT>(src, h * D + d)));
        out[h] = m;
    }
}
void segment_amax(const void* src, int dtype, size_t H, size_t D, float* out) {
    TIERKV_DTYPE_SWITCH(dtype, DT, segment_amax_t<DT>(src, H, D, out))
}

template <int DT, int C>
void quantize_rows_t(const void* src, size_t rows, size_t n, const float* inv, uint8_t* dst) {
    for (size_t r = 0; r < rows; ++r)
        for (size_t j = 0; j < n; ++j) dst[r * n + j] = quantize1<C>(load1<DT>(src, r * n + j), inv[j]);
}
void quantize_rows(const void* src, int dtype, size_t rows, size_t n, const float* inv, int codec, uint8_t* dst) {
    TIERKV_DTYPE_SWITCH(dtype, DT, TIERKV_CODEC_SWITCH(codec, C, quantize_rows_t<DT, C>(src, rows, n, inv, dst)))
}

template <int DT, int C>
void dequantize_rows_t(const uint8_t* src, size_t rows, size_t n, const float* scale, void* dst) {
    for (size_t r = 0; r < rows; ++r)
        for (size_t j = 0; j < n; ++j) store1<DT>(dst, r * n + j, decode1<C>(src[r * n + j]) * scale[j]);
}
void dequantize_rows(const uint8_t* src, int codec, size_t rows, size_t n, const float* scale, int dtype,
                     void* dst) {
    TIERKV_DTYPE_SWITCH(dtype, DT,
                        TIERKV_CODEC_SWITCH(codec, C, dequantize_rows_t<DT, C>(src, rows, n, scale, dst)))
}

bool all_finite(const void* src, int dtype, size_t numel) {
    if (dtype == kF32) {
        const auto* p = static_cast<const uint8_t*>(src);
        for (size_t i = 0; i < numel; ++i) {
            uint32_t u;
            std::memcpy(&u, p + 4 * i, 4);
            if ((u & 0x7f800000u) == 0x7f800000u) return false;
        }
        return true;
    }
    const uint16_t exp_mask = dtype == kBF16 ? 0x7f80u : 0x7c00u;
    const auto* p = static_cast<const uint8_t*>(src);
    for (size_t i = 0; i < numel; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        if ((h & exp_mask) == exp_mask) return false;
    }
    return true;
}

constexpr Kernels kernels{amax_rows, segment_amax, quantize_rows, dequantize_rows, all_finite};

}  // namespace scalar

#if TIERKV_X86
// --------------------------------------------------------------------------------------------------------- AVX2
#define TIERKV_AVX2 __attribute__((target("avx2,f16c")))
namespace avx2 {

constexpr size_t W = 8;

template <int DT>
TIERKV_AVX2 inline __m256 load(const void* p) {
    if constexpr (DT == kF32) {
        return _mm256_loadu_ps(static_cast<const float*>(p));
    } else {
        const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
        if constexpr (DT == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        else return _mm256_cvtph_ps(h);
    }
}

// A partial vector (r < W elements) through a zero-filled buffer, so tails take the same arithmetic.
template <int DT>
TIERKV_AVX2 inline __m256 load_part(const void* p, size_t r) {
    alignas(32) uint8_t buf[32] = {};
    std::memcpy(buf, p, r * dtype_size(DT));
    return load<DT>(buf);
}

template <int DT>
TIERKV_AVX2 inline void store(void* p, __m256 v) {
    if constexpr (DT == kF32) {
        _mm256_storeu_ps(static_cast<float*>(p), v);
    } else if constexpr (DT == kBF16) {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r = _mm256_or_si256(r, _mm256_srli_epi32(nan, 16));  // NaN -> 0xffff
        const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(static_cast<__m128i*>(p), h);
    } else {
        _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
}

template <int DT>
TIERKV_AVX2 inline void store_part(void* p, __m256 v, size_t r) {
    alignas(32) uint8_t buf[32];
    store<DT>(buf, v);
    std::memcpy(p, buf, r * dtype_size(DT));
}

TIERKV_AVX2 inline __m256 absf(__m256 v) {
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

// 8 float32 (clamped to +-448) -> 8 e4m3fn codes in the low byte of each 32-bit lane.
TIERKV_AVX2 inline __m256i to_e4m3(__m256 y) {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(a, 20), one);
    const __m256i normal = _mm256_sub_epi32(
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7ffff)), lsb), 20),
        _mm256_set1_epi32(120 << 3));
    const __m256i is_normal = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x3c7fffff));
    if (_mm256_movemask_ps(_mm256_castsi256_ps(is_normal)) == 0xff) return _mm256_or_si256(normal, sign);
    const __m256i e = _mm256_srli_epi32(a, 23);
    const __m256i s = _mm256_min_epu32(_mm256_sub_epi32(_mm256_set1_epi32(141), e), _mm256_set1_epi32(31));
    const __m256i has_implicit = _mm256_andnot_si256(_mm256_cmpeq_epi32(e, _mm256_setzero_si256()),
                                                     _mm256_set1_epi32(0x800000));
    const __m256i mant = _mm256_or_si256(_mm256_and_si256(a, _mm256_set1_epi32(0x7fffff)), has_implicit);
    const __m256i half_m1 = _mm256_sub_epi32(_mm256_sllv_epi32(one, _mm256_sub_epi32(s, one)), one);
    const __m256i odd = _mm256_and_si256(_mm256_srlv_epi32(mant, s), one);
    const __m256i sub = _mm256_srlv_epi32(_mm256_add_epi32(_mm256_add_epi32(mant, half_m1), odd), s);
    return _mm256_or_si256(_mm256_blendv_epi8(sub, normal, is_normal), sign);
}

// 8 e4m3fn codes (32-bit lanes) -> float32.
TIERKV_AVX2 inline __m256 from_e4m3(__m256i b) {
    const __m256i m7 = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
    const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(m7, 20), _mm256_set1_epi32(120 << 23));
    const __m256i sub = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(m7), _mm256_set1_ps(0x1p-9f)));
    const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), m7);
    __m256i v = _mm256_blendv_epi8(normal, sub, is_sub);
    const __m256i is_nan = _mm256_cmpeq_epi32(m7, _mm256_set1_epi32(0x7f));
    v = _mm256_blendv_epi8(v, _mm256_set1_epi32(0x7ff00000), is_nan);
    return _mm256_castsi256_ps(_mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24)));
}

template <int C>
TIERKV_AVX2 inline __m128i quantize8(__m256 x, __m256 inv) {  // 8 codes in the low 8 bytes
    constexpr float q = C == kFP8 ? 448.0f : 127.0f;
    const __m256 y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), _mm256_set1_ps(-q)), _mm256_set1_ps(q));
    __m256i c;
    if constexpr (C == kFP8) c = to_e4m3(y);
    else c = _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    if constexpr (C == kFP8) return _mm_packus_epi16(w, w);  // codes 0..0xfe
    else return _mm_packs_epi16(w, w);                       // -127..127
}

template <int C>
TIERKV_AVX2 inline __m256 decode8(const uint8_t* p) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    if constexpr (C == kFP8) return from_e4m3(_mm256_cvtepu8_epi32(b));
    else return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

template <int DT>
TIERKV_AVX2 void amax_rows_t(const void* src, size_t rows, size_t n, float* acc) {
    const auto* base = static_cast<const uint8_t*>(src);
    const size_t es = dtype_size(DT);
    size_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
        __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
        for (size_t r = 0; r < rows; ++r) {
            const uint8_t* p = base + (r * n + j) * es;
            m0 = _mm256_max_ps(m0, absf(load<DT>(p)));
            m1 = _mm256_max_ps(m1, absf(load<DT>(p + W * es)));
            m2 = _mm256_max_ps(m2, absf(load<DT>(p + 2 * W * es)));
            m3 = _mm256_max_ps(m3, absf(load<DT>(p + 3 * W * es)));
        }
        _mm256_storeu_ps(acc + j, m0);
        _mm256_storeu_ps(acc + j + W, m1);
        _mm256_storeu_ps(acc + j + 2 * W, m2);
        _mm256_storeu_ps(acc + j + 3 * W, m3);
    }
    for (; j < n; j += W) {
        const size_t r_left = std::min(W, n - j);
        __m256 m = _mm256_setzero_ps();
        for (size_t r = 0; r < rows; ++r) {
            const uint8_t* p = base + (r * n + j) * es;
            m = _mm256_max_ps(m, absf(r_left == W ? load<DT>(p) : load_part<DT>(p, r_left)));
        }
        alignas(32) float buf[W];
        _mm256_store_ps(buf, m);
        std::memcpy(acc + j, buf, r_left * 4);
    }
}
TIERKV_AVX2 void amax_rows(const void* src, int dtype, size_t rows, size_t n, float* acc) {
    TIERKV_DTYPE_SWITCH(dtype, DT, amax_rows_t<DT>(src, rows, n, acc))
}

TIERKV_AVX2 inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

template <int DT>
TIERKV_AVX2 void segment_amax_t(const void* src, size_t H, size_t D, float* out) {
    const auto* base = static_cast<const uint8_t*>(src);
    const size_t es = dtype_size(DT);
    for (size_t h = 0; h < H; ++h) {
        __m256 m = _mm256_setzero_ps();
        size_t d = 0;
        for (; d + W <= D; d += W) m = _mm256_max_ps(m, absf(load<DT>(base + (h * D + d) * es)));
        if (d < D) m = _mm256_max_ps(m, absf(load_part<DT>(base + (h * D + d) * es, D - d)));
        out[h] = hmax(m);
    }
}
TIERKV_AVX2 void segment_amax(const void* src, int dtype, size_t H, size_t D, float* out) {
    TIERKV_DTYPE_SWITCH(dtype, DT, segment_amax_t<DT>(src, H, D, out))
}

template <int DT, int C>
TIERKV_AVX2 void quantize_rows_t(const void* src, size_t rows, size_t n, const float* inv, uint8_t* dst) {
    const auto* base = static_cast<const uint8_t*>(src);
    const size_t es = dtype_size(DT);
    for (size_t r = 0; r < rows; ++r) {
        const uint8_t* s = base + r * n * es;
        uint8_t* d = dst + r * n;
        size_t j = 0;
        for (; j + W <= n; j += W)
            _mm_storel_epi64(reinterpret_cast<__m128i*>(d + j),
                             quantize8<C>(load<DT>(s + j * es), _mm256_loadu_ps(inv + j)));
        if (j < n) {
            const size_t left = n - j;
            alignas(32) float ibuf[W] = {};
            std::memcpy(ibuf, inv + j, left * 4);
            alignas(16) uint8_t out[16];
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out), quantize8<C>(load_part<DT>(s + j * es, left),
                                                                             _mm256_load_ps(ibuf)));
            std::memcpy(d + j, out, left);
        }
    }
}
TIERKV_AVX2 void quantize_rows(const void* src, int dtype, size_t rows, size_t n, const float* inv, int codec,
                               uint8_t* dst) {
    TIERKV_DTYPE_SWITCH(dtype, DT, TIERKV_CODEC_SWITCH(codec, C, quantize_rows_t<DT, C>(src, rows, n, inv, dst)))
}

template <int DT, int C>
TIERKV_AVX2 void dequantize_rows_t(const uint8_t* src, size_t rows, size_t n, const float* scale, void* dst) {
    auto* base = static_cast<uint8_t*>(dst);
    const size_t es = dtype_size(DT);
    for (size_t r = 0; r < rows; ++r) {
        const uint8_t* s = src + r * n;
        uint8_t* d = base + r * n * es;
        size_t j = 0;
        for (; j + W <= n; j += W)
            store<DT>(d + j * es, _mm256_mul_ps(decode8<C>(s + j), _mm256_loadu_ps(scale + j)));
        if (j < n) {
            const size_t left = n - j;
            alignas(32) float sbuf[W] = {};
            alignas(16) uint8_t qbuf[16] = {};
            std::memcpy(sbuf, scale + j, left * 4);
            std::memcpy(qbuf, s + j, left);
            store_part<DT>(d + j * es, _mm256_mul_ps(decode8<C>(qbuf), _mm256_load_ps(sbuf)), left);
        }
    }
}
TIERKV_AVX2 void dequantize_rows(const uint8_t* src, int codec, size_t rows, size_t n, const float* scale,
                                 int dtype, void* dst) {
    TIERKV_DTYPE_SWITCH(dtype, DT,
                        TIERKV_CODEC_SWITCH(codec, C, dequantize_rows_t<DT, C>(src, rows, n, scale, dst)))
}

TIERKV_AVX2 bool all_finite(const void* src, int dtype, size_t numel) {
    const auto* p = static_cast<const uint8_t*>(src);
    const size_t nbytes = numel * dtype_size(dtype);
    __m256i mask;
    if (dtype == kF32) mask = _mm256_set1_epi32(0x7f800000);
    else mask = _mm256_set1_epi16(static_cast<short>(dtype == kBF16 ? 0x7f80 : 0x7c00));
    size_t i = 0;
    for (; i + 128 <= nbytes; i += 128) {  // 4 vectors per check: the early exit costs one branch
        __m256i bad = _mm256_setzero_si256();
        for (size_t k = 0; k < 4; ++k) {
            const __m256i v = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32 * k)),
                                               mask);
            bad = _mm256_or_si256(bad, dtype == kF32 ? _mm256_cmpeq_epi32(v, mask) : _mm256_cmpeq_epi16(v, mask));
        }
        if (!_mm256_testz_si256(bad, bad)) return false;
    }
    return scalar::all_finite(p + i, dtype, (nbytes - i) / dtype_size(dtype));
}

constexpr Kernels kernels{amax_rows, segment_amax, quantize_rows, dequantize_rows, all_finite};

}  // namespace avx2

// ------------------------------------------------------------------------------------------------------ AVX-512
#define TIERKV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))
namespace avx512 {

constexpr size_t W = 16;

TIERKV_AVX512 inline __mmask16 part_mask(size_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

template <int DT>
TIERKV_AVX512 inline __m512 load(const void* p, __mmask16 m) {
    if constexpr (DT == kF32) {
        return _mm512_maskz_loadu_ps(m, p);
    } else {
        const __m256i h = _mm256_maskz_loadu_epi16(m, p);
        if constexpr (DT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        else return _mm512_cvtph_ps(h);
    }
}

template <int DT>
TIERKV_AVX512 inline __m512 load(const void* p) {
    if constexpr (DT == kF32) {
        return _mm512_loadu_ps(p);
    } else {
        const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
        if constexpr (DT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        else return _mm512_cvtph_ps(h);
    }
}

template <int DT>
TIERKV_AVX512 inline void store(void* p, __m512 v, __mmask16 m) {
    if constexpr (DT == kF32) {
        _mm512_mask_storeu_ps(p, m, v);
    } else if constexpr (DT == kBF16) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xffff));
        _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
    } else {
        _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
}

TIERKV_AVX512 inline __m512 absf(__m512 v) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

TIERKV_AVX512 inline __m512i to_e4m3(__m512 y) {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
    const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(a, 20), one);
    const __m512i normal = _mm512_sub_epi32(
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(0x7ffff)), lsb), 20),
        _mm512_set1_epi32(120 << 3));
    const __mmask16 is_normal = _mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(0x3c800000));
    if (is_normal == 0xffff) return _mm512_or_si512(normal, sign);  // the usual case: no e4m3 subnormal
    const __m512i e = _mm512_srli_epi32(a, 23);
    const __m512i s = _mm512_min_epu32(_mm512_sub_epi32(_mm512_set1_epi32(141), e), _mm512_set1_epi32(31));
    const __m512i mant = _mm512_mask_or_epi32(_mm512_and_si512(a, _mm512_set1_epi32(0x7fffff)),
                                              _mm512_test_epi32_mask(e, e),
                                              _mm512_and_si512(a, _mm512_set1_epi32(0x7fffff)),
                                              _mm512_set1_epi32(0x800000));
    const __m512i half_m1 = _mm512_sub_epi32(_mm512_sllv_epi32(one, _mm512_sub_epi32(s, one)), one);
    const __m512i odd = _mm512_and_si512(_mm512_srlv_epi32(mant, s), one);
    const __m512i sub = _mm512_srlv_epi32(_mm512_add_epi32(_mm512_add_epi32(mant, half_m1), odd), s);
    return _mm512_or_si512(_mm512_mask_blend_epi32(is_normal, sub, normal), sign);
}

TIERKV_AVX512 inline __m512 from_e4m3(__m512i b) {
    const __m512i m7 = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
    __m512i v = _mm512_add_epi32(_mm512_slli_epi32(m7, 20), _mm512_set1_epi32(120 << 23));
    const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(m7), _mm512_set1_ps(0x1p-9f));
    v = _mm512_mask_mov_epi32(v, _mm512_cmplt_epu32_mask(m7, _mm512_set1_epi32(8)), _mm512_castps_si512(sub));
    v = _mm512_mask_mov_epi32(v, _mm512_cmpeq_epi32_mask(m7, _mm512_set1_epi32(0x7f)), _mm512_set1_epi32(0x7ff00000));
    return _mm512_castsi512_ps(_mm512_or_si512(v, _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24)));
}

template <int C>
TIERKV_AVX512 inline __m128i quantize16(__m512 x, __m512 inv) {
    constexpr float q = C == kFP8 ? 448.0f : 127.0f;
    const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, inv), _mm512_set1_ps(-q)), _mm512_set1_ps(q));
    if constexpr (C == kFP8) return _mm512_cvtepi32_epi8(to_e4m3(y));
    else return _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <int C>
TIERKV_AVX512 inline __m512 decode16(__m128i b) {
    if constexpr (C == kFP8) return from_e4m3(_mm512_cvtepu8_epi32(b));
    else return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

template <int DT>
TIERKV_AVX512 void amax_rows_t(const void* src, size_t rows, size_t n, float* acc) {
    const auto* base = static_cast<const uint8_t*>(src);
    const size_t es = dtype_size(DT);
    size_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
        __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
        for (size_t r = 0; r < rows; ++r) {
            const uint8_t* p = base + (r * n + j) * es;
            m0 = _mm512_max_ps(m0, absf(load<DT>(p)));
            m1 = _mm512_max_ps(m1, absf(load<DT>(p + W * es)));
            m2 = _mm512_max_ps(m2, absf(load<DT>(p + 2 * W * es)));
            m3 = _mm512_max_ps(m3, absf(load<DT>(p + 3 * W * es)));
        }
        _mm512_storeu_ps(acc + j, m0);
        _mm512_storeu_ps(acc + j + W, m1);
        _mm512_storeu_ps(acc + j + 2 * W, m2);
        _mm512_storeu_ps(acc + j + 3 * W, m3);
    }
    for (; j < n; j += W) {
        const size_t left = std::min(W, n - j);
        const __mmask16 k = left == W ? static_cast<__mmask16>(0xffff) : part_mask(left);
        __m512 m = _mm512_setzero_ps();
        for (size_t r = 0; r < rows; ++r) m = _mm512_max_ps(m, absf(load<DT>(base + (r * n + j) * es, k)));
        _mm512_mask_storeu_ps(acc + j, k, m);
    }
}
TIERKV_AVX512 void amax_rows(const void* src, int dtype, size_t rows, size_t n, float* acc) {
    TIERKV_DTYPE_SWITCH(dtype, DT, amax_rows_t<DT>(src, rows, n, acc))
}

template <int DT>
TIERKV_AVX512 void segment_amax_t(const void* src, size_t H, size_t D, float* out) {
    const auto* base = static_cast<const uint8_t*>(src);
    const size_t es = dtype_size(DT);
    const __mmask16 tail = part_mask(D % W);
    for (size_t h = 0; h < H; ++h) {
        __m512 m = _mm512_setzero_ps();
        size_t d = 0;
        for (; d + W <= D; d += W) m = _mm512_max_ps(m, absf(load<DT>(base + (h * D + d) * es)));
        if (d < D) m = _mm512_max_ps(m, absf(load<DT>(base + (h * D + d) * es, tail)));
        out[h] = _mm512_reduce_max_ps(m);
    }
}
TIERKV_AVX512 void segment_amax(const void* src, int dtype, size_t H, size_t D, float* out) {
    TIERKV_DTYPE_SWITCH(dtype, DT, segment_amax_t<DT>(src, H, D, out))
}

template <int DT, int C>
TIERKV_AVX512 void quantize_rows_t(const void* src, size_t rows, size_t n, const float* inv, uint8_t* dst) {
    const auto* base = static_cast<const uint8_t*>(src);
    const size_t es = dtype_size(DT);
    const __mmask16 tail = part_mask(n % W);
    for (size_t r = 0; r < rows; ++r) {
        const uint8_t* s = base + r * n * es;
        uint8_t* d = dst + r * n;
        size_t j = 0;
        for (; j + 4 * W <= n; j += 4 * W) {  // 64 codes, one 64-byte store
            const __m128i c0 = quantize16<C>(load<DT>(s + j * es), _mm512_loadu_ps(inv + j));
            const __m128i c1 = quantize16<C>(load<DT>(s + (j + W) * es), _mm512_loadu_ps(inv + j + W));
            const __m128i c2 = quantize16<C>(load<DT>(s + (j + 2 * W) * es), _mm512_loadu_ps(inv + j + 2 * W));
            const __m128i c3 = quantize16<C>(load<DT>(s + (j + 3 * W) * es), _mm512_loadu_ps(inv + j + 3 * W));
            const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(c0), c1, 1);
            const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(c2), c3, 1);
            _mm512_storeu_si512(d + j, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        }
        for (; j + W <= n; j += W)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j),
                             quantize16<C>(load<DT>(s + j * es), _mm512_loadu_ps(inv + j)));
        if (j < n)
            _mm_mask_storeu_epi8(d + j, tail,
                                 quantize16<C>(load<DT>(s + j * es, tail), _mm512_maskz_loadu_ps(tail, inv + j)));
    }
}
TIERKV_AVX512 void quantize_rows(const void* src, int dtype, size_t rows, size_t n, const float* inv, int codec,
                                 uint8_t* dst) {
    TIERKV_DTYPE_SWITCH(dtype, DT, TIERKV_CODEC_SWITCH(codec, C, quantize_rows_t<DT, C>(src, rows, n, inv, dst)))
}

template <int DT, int C>
TIERKV_AVX512 void dequantize_rows_t(const uint8_t* src, size_t rows, size_t n, const float* scale, void* dst) {
    auto* base = static_cast<uint8_t*>(dst);
    const size_t es = dtype_size(DT);
    const __mmask16 tail = part_mask(n % W);
    for (size_t r = 0; r < rows; ++r) {
        const uint8_t* s = src + r * n;
        uint8_t* d = base + r * n * es;
        size_t j = 0;
        for (; j + W <= n; j += W) {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j));
            store<DT>(d + j * es, _mm512_mul_ps(decode16<C>(b), _mm512_loadu_ps(scale + j)), 0xffff);
        }
        if (j < n) {
            const __m128i b = _mm_maskz_loadu_epi8(tail, s + j);
            store<DT>(d + j * es, _mm512_mul_ps(decode16<C>(b), _mm512_maskz_loadu_ps(tail, scale + j)), tail);
        }
    }
}
TIERKV_AVX512 void dequantize_rows(const uint8_t* src, int codec, size_t rows, size_t n, const float* scale,
                                   int dtype, void* dst) {
    TIERKV_DTYPE_SWITCH(dtype, DT,
                        TIERKV_CODEC_SWITCH(codec, C, dequantize_rows_t<DT, C>(src, rows, n, scale, dst)))
}

// A lane is non-finite iff its exponent bits are all ones.
TIERKV_AVX512 inline bool nonfinite(__m512i v, __m512i mask, bool f32) {
    v = _mm512_and_si512(v, mask);
    return f32 ? _mm512_cmpeq_epi32_mask(v, mask) != 0 : _mm512_cmpeq_epi16_mask(v, mask) != 0;
}

TIERKV_AVX512 bool all_finite(const void* src, int dtype, size_t numel) {
    const auto* p = static_cast<const uint8_t*>(src);
    const size_t nbytes = numel * dtype_size(dtype);
    const bool f32 = dtype == kF32;
    const __m512i mask = f32 ? _mm512_set1_epi32(0x7f800000)
                             : _mm512_set1_epi16(static_cast<short>(dtype == kBF16 ? 0x7f80 : 0x7c00));
    auto bad = [&](__m512i v) { return nonfinite(v, mask, f32); };
    size_t i = 0;
    for (; i + 256 <= nbytes; i += 256) {
        const __m512i a = _mm512_loadu_si512(p + i), b = _mm512_loadu_si512(p + i + 64);
        const __m512i c = _mm512_loadu_si512(p + i + 128), d = _mm512_loadu_si512(p + i + 192);
        if (bad(a) | bad(b) | bad(c) | bad(d)) return false;
    }
    for (; i + 64 <= nbytes; i += 64)
        if (bad(_mm512_loadu_si512(p + i))) return false;
    if (i < nbytes) {  // < 64 bytes; whole elements only, and masked-off lanes read as 0 (finite)
        const __mmask64 k = (~0ull) >> (64 - (nbytes - i));
        if (bad(_mm512_maskz_loadu_epi8(k, p + i))) return false;
    }
    return true;
}

constexpr Kernels kernels{amax_rows, segment_amax, quantize_rows, dequantize_rows, all_finite};

}  // namespace avx512
#endif  // TIERKV_X86

// ------------------------------------------------------------------------------------------------- ISA selection
bool isa_supported(int isa) {
#if TIERKV_X86
    if (isa == kAvx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("f16c");
    if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    return isa == kScalar;
}

int best_isa() {
    for (int isa : {kAvx512, kAvx2})
        if (isa_supported(isa)) return isa;
    return kScalar;
}

std::atomic<int> g_isa{-1};

int current_isa() {
    int isa = g_isa.load(std::memory_order_relaxed);
    if (isa < 0) {
        isa = best_isa();
        g_isa.store(isa, std::memory_order_relaxed);
    }
    return isa;
}

const Kernels& kernels_for(int isa) {
#if TIERKV_X86
    if (isa == kAvx512) return avx512::kernels;
    if (isa == kAvx2) return avx2::kernels;
#endif
    (void)isa;
    return scalar::kernels;
}

const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

// ----------------------------------------------------------------------------------------------------- the driver
struct Geometry {
    int codec, dtype;
    size_t L, T, H, D;
    size_t n_scales() const { return codec == kFP8 ? L * 2 * H : L * H * D + L * T * H; }
    size_t values_offset() const {
        const size_t end = kHeaderBytes + 4 * n_scales();
        return (end + kValuesAlignment - 1) / kValuesAlignment * kValuesAlignment;
    }
};

inline float scale_of(float amax, float qmax) {
    const float s = amax / qmax;
    return s < kScaleFloor ? kScaleFloor : s;
}

// Scratch rows of one call, reused across its blocks.
struct Scratch {
    std::vector<float> scales, acc, row, seg;
    explicit Scratch(const Geometry& g)
        : scales(g.n_scales()), acc(g.H * g.D), row(g.H * g.D), seg(g.H) {}
};

void quantize_block(const Kernels& k, const Geometry& g, const uint8_t* src, uint8_t* dst, Scratch& w) {
    const size_t HD = g.H * g.D, slab = g.T * HD, es = dtype_size(g.dtype);
    const float qmax = qmax_of(g.codec);
    const size_t n_scales = g.n_scales(), voff = g.values_offset();
    uint8_t* values = dst + voff;
    float* scales = w.scales.data();
    float* acc = w.acc.data();
    float* inv = w.row.data();
    float* seg = w.seg.data();
    for (size_t l = 0; l < g.L; ++l) {
        for (size_t kv = 0; kv < 2; ++kv) {
            const size_t slab_index = (l * 2 + kv) * slab;
            const uint8_t* s = src + slab_index * es;
            uint8_t* q = values + slab_index;
            if (g.codec == kFP8) {  // one scale per head over (tokens, dim)
                k.amax_rows(s, g.dtype, g.T, HD, acc);
                k.segment_amax(acc, kF32, g.H, g.D, seg);
                for (size_t h = 0; h < g.H; ++h) {
                    const float sc = scale_of(seg[h], qmax);
                    scales[(l * 2 + kv) * g.H + h] = sc;
                    std::fill(inv + h * g.D, inv + (h + 1) * g.D, 1.0f / sc);
                }
                k.quantize_rows(s, g.dtype, g.T, HD, inv, kFP8, q);
            } else if (kv == 0) {  // int8 K: one scale per channel (head, dim) over tokens
                k.amax_rows(s, g.dtype, g.T, HD, acc);
                for (size_t j = 0; j < HD; ++j) {
                    const float sc = scale_of(acc[j], qmax);
                    scales[l * HD + j] = sc;
                    inv[j] = 1.0f / sc;
                }
                k.quantize_rows(s, g.dtype, g.T, HD, inv, kINT8, q);
            } else {  // int8 V: one scale per (token, head) over dim
                float* vscales = scales + g.L * HD + l * g.T * g.H;
                for (size_t t = 0; t < g.T; ++t) {
                    const uint8_t* row = s + t * HD * es;
                    k.segment_amax(row, g.dtype, g.H, g.D, seg);
                    for (size_t h = 0; h < g.H; ++h) {
                        const float sc = scale_of(seg[h], qmax);
                        vscales[t * g.H + h] = sc;
                        std::fill(inv + h * g.D, inv + (h + 1) * g.D, 1.0f / sc);
                    }
                    k.quantize_rows(row, g.dtype, 1, HD, inv, kINT8, q + t * HD);
                }
            }
        }
    }
    uint8_t header[kHeaderBytes] = {kFormatVersion, static_cast<uint8_t>(g.codec), static_cast<uint8_t>(g.dtype), 0};
    const uint32_t ns = static_cast<uint32_t>(n_scales);
    for (int b = 0; b < 4; ++b) header[4 + b] = static_cast<uint8_t>(ns >> (8 * b));  // little-endian
    std::memcpy(dst, header, kHeaderBytes);
    std::memcpy(dst + kHeaderBytes, scales, 4 * n_scales);  // x86 and every supported target: little-endian
    std::memset(dst + kHeaderBytes + 4 * n_scales, 0, voff - kHeaderBytes - 4 * n_scales);
}

void dequantize_block(const Kernels& k, const Geometry& g, const uint8_t* src, uint8_t* dst, Scratch& w) {
    const size_t HD = g.H * g.D, slab = g.T * HD, es = dtype_size(g.dtype);
    float* scales = w.scales.data();
    std::memcpy(scales, src + kHeaderBytes, 4 * g.n_scales());
    const uint8_t* values = src + g.values_offset();
    float* row = w.row.data();
    for (size_t l = 0; l < g.L; ++l) {
        for (size_t kv = 0; kv < 2; ++kv) {
            const size_t slab_index = (l * 2 + kv) * slab;
            const uint8_t* q = values + slab_index;
            uint8_t* out = dst + slab_index * es;
            if (g.codec == kFP8) {
                for (size_t h = 0; h < g.H; ++h)
                    std::fill(row + h * g.D, row + (h + 1) * g.D, scales[(l * 2 + kv) * g.H + h]);
                k.dequantize_rows(q, kFP8, g.T, HD, row, g.dtype, out);
            } else if (kv == 0) {
                k.dequantize_rows(q, kINT8, g.T, HD, scales + l * HD, g.dtype, out);
            } else {
                const float* vscales = scales + g.L * HD + l * g.T * g.H;
                for (size_t t = 0; t < g.T; ++t) {
                    for (size_t h = 0; h < g.H; ++h)
                        std::fill(row + h * g.D, row + (h + 1) * g.D, vscales[t * g.H + h]);
                    k.dequantize_rows(q + t * HD, kINT8, 1, HD, row, g.dtype, out + t * HD * es);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------ Python binding
using AnyArray = nb::ndarray<nb::ro>;

std::string dtype_str(const nb::dlpack::dtype& dt) {
    const char* kind = "?";
    switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
        case nb::dlpack::dtype_code::Int: kind = "int"; break;
        case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
        case nb::dlpack::dtype_code::Float: kind = "float"; break;
        case nb::dlpack::dtype_code::Bool: return "bool";
        default: kind = "other"; break;
    }
    return std::string(kind) + std::to_string(dt.bits);
}

std::vector<uint64_t> pointer_table(const AnyArray& a, const char* what) {
    if (a.device_type() != nb::device::cpu::value)
        throw std::invalid_argument(std::string("expected ") + what + " as a CPU array, got one on another device");
    if (a.ndim() != 1)
        throw std::invalid_argument(std::string("expected ") + what + " as a 1-D uint64 array, got " +
                                    std::to_string(a.ndim()) + " dimensions");
    if (a.dtype() != nb::dtype<uint64_t>())
        throw std::invalid_argument(std::string("expected ") + what + " of dtype uint64, got " + dtype_str(a.dtype()));
    const size_t n = a.shape(0);
    std::vector<uint64_t> out(n);
    const auto* base = static_cast<const uint64_t*>(a.data());
    const int64_t stride = n > 0 ? a.stride(0) : 1;
    for (size_t i = 0; i < n; ++i) {
        out[i] = base[static_cast<int64_t>(i) * stride];
        if (out[i] == 0)
            throw std::invalid_argument(std::string("expected non-null pointers in ") + what + ", got 0 at index " +
                                        std::to_string(i));
    }
    return out;
}

int check_dtype_id(int64_t dtype_id) {
    if (dtype_id < 1 || dtype_id > 3)
        throw std::invalid_argument("expected dtype_id 1 (float16), 2 (bfloat16) or 3 (float32), got " +
                                    std::to_string(dtype_id));
    return static_cast<int>(dtype_id);
}

Geometry check_geometry(int64_t codec_id, int64_t dtype_id, int64_t L, int64_t T, int64_t H, int64_t D) {
    if (codec_id != kFP8 && codec_id != kINT8)
        throw std::invalid_argument("expected codec_id 1 (fp8) or 2 (int8), got " + std::to_string(codec_id));
    const int dtype = check_dtype_id(dtype_id);
    const char* names[] = {"L (layers)", "T (tokens)", "H (heads)", "D (head dim)"};
    const int64_t dims[] = {L, T, H, D};
    unsigned __int128 numel = 2;
    for (int i = 0; i < 4; ++i) {
        if (dims[i] < 1)
            throw std::invalid_argument(std::string("expected a positive ") + names[i] + ", got " +
                                        std::to_string(dims[i]));
        numel *= static_cast<uint64_t>(dims[i]);
    }
    if (numel * 4 > (static_cast<unsigned __int128>(1) << 48))
        throw std::invalid_argument("expected a block of at most 2^46 elements, got L=" + std::to_string(L) +
                                    " T=" + std::to_string(T) + " H=" + std::to_string(H) + " D=" + std::to_string(D));
    return Geometry{static_cast<int>(codec_id), dtype, static_cast<size_t>(L), static_cast<size_t>(T),
                    static_cast<size_t>(H), static_cast<size_t>(D)};
}

template <bool kQuantize>
void run_codec(int64_t codec_id, int64_t dtype_id, int64_t L, int64_t T, int64_t H, int64_t D, AnyArray src_ptrs,
               AnyArray dst_ptrs) {
    const Geometry g = check_geometry(codec_id, dtype_id, L, T, H, D);
    const std::vector<uint64_t> src = pointer_table(src_ptrs, "src_ptrs");
    const std::vector<uint64_t> dst = pointer_table(dst_ptrs, "dst_ptrs");
    if (src.size() != dst.size())
        throw std::invalid_argument("expected src_ptrs and dst_ptrs of equal length, got " +
                                    std::to_string(src.size()) + " and " + std::to_string(dst.size()));
    if (src.empty()) return;
    const Kernels& k = kernels_for(current_isa());
    Scratch w(g);
    nb::gil_scoped_release release;
    for (size_t i = 0; i < src.size(); ++i) {
        auto* s = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(src[i]));
        auto* d = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(dst[i]));
        if constexpr (kQuantize) quantize_block(k, g, s, d, w);
        else dequantize_block(k, g, s, d, w);
    }
}

bool all_finite_py(int64_t dtype_id, uint64_t ptr, int64_t numel) {
    const int dtype = check_dtype_id(dtype_id);
    if (numel < 0) throw std::invalid_argument("expected numel >= 0, got " + std::to_string(numel));
    if (numel == 0) return true;
    if (ptr == 0) throw std::invalid_argument("expected a non-null ptr for numel " + std::to_string(numel) + ", got 0");
    const Kernels& k = kernels_for(current_isa());
    nb::gil_scoped_release release;
    return k.all_finite(reinterpret_cast<const void*>(static_cast<uintptr_t>(ptr)), dtype, static_cast<size_t>(numel));
}

void set_cpu_isa(const std::string& name) {
    int isa;
    if (name == "avx512") isa = kAvx512;
    else if (name == "avx2") isa = kAvx2;
    else if (name == "scalar") isa = kScalar;
    else throw std::invalid_argument("expected an ISA name 'avx512', 'avx2' or 'scalar', got '" + name + "'");
    if (!isa_supported(isa))
        throw std::invalid_argument(std::string("expected an ISA this CPU supports (best: '") + isa_name(best_isa()) +
                                    "'), got '" + name + "'");
    g_isa.store(isa, std::memory_order_relaxed);
}

}  // namespace

void bind_codec(nanobind::module_& m) {
    m.def("quantize", &run_codec<true>, nb::arg("codec_id"), nb::arg("dtype_id"), nb::arg("L"), nb::arg("T"),
          nb::arg("H"), nb::arg("D"), nb::arg("src_ptrs"), nb::arg("dst_ptrs"),
          "Encode blocks [L, 2, T, H, D] (one per src pointer) into format-v1 rows (one per dst pointer).");
    m.def("dequantize", &run_codec<false>, nb::arg("codec_id"), nb::arg("dtype_id"), nb::arg("L"), nb::arg("T"),
          nb::arg("H"), nb::arg("D"), nb::arg("src_ptrs"), nb::arg("dst_ptrs"),
          "Decode format-v1 rows (one per src pointer) into blocks [L, 2, T, H, D] (one per dst pointer).");
    m.def("all_finite", &all_finite_py, nb::arg("dtype_id"), nb::arg("ptr"), nb::arg("numel"),
          "True when the contiguous buffer of numel elements of the dtype holds no NaN or infinity.");
    m.def("cpu_isa", []() { return std::string(isa_name(current_isa())); },
          "The instruction set the codec kernels use: 'avx512', 'avx2' or 'scalar'.");
    m.def("set_cpu_isa", &set_cpu_isa, nb::arg("name"),
          "Select the codec kernels' instruction set ('avx512', 'avx2', 'scalar'); ValueError if the CPU lacks it.");
}

}  // namespace tierkv
