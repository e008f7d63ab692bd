// CUDA kernels of the lossy codecs (fp8 e4m3fn and int8 with float32 scales); format: tierkv/codec/format.py.
//
// This header is read by nvcc (codec_cuda.cu) and by the host C++ compiler (cuda_module.cpp), so the scalar
// conversions below are __host__ __device__ and the host module can check them against torch without a GPU.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#define TIERKV_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define TIERKV_HD inline
#endif

namespace tierkv::cuda {

constexpr int kCodecFp8 = 1;
constexpr int kCodecInt8 = 2;
constexpr int kDtypeF16 = 1;
constexpr int kDtypeBF16 = 2;
constexpr int kDtypeF32 = 3;
constexpr int kFormatVersion = 1;
constexpr int64_t kHeaderBytes = 16;
constexpr int64_t kValuesAlignment = 64;
constexpr float kScaleFloor = 1.1754943508222875e-38f;  // 2**-126, the smallest normal float32

// Sizes of one block [L, 2, T, H, D] under a codec (format v1).
struct Geometry {
    int codec;
    int dtype;
    int64_t L, T, H, D;

    TIERKV_HD int64_t n_scales() const { return codec == kCodecFp8 ? L * 2 * H : L * H * D + L * T * H; }
    TIERKV_HD int64_t values_offset() const {
        const int64_t end = kHeaderBytes + 4 * n_scales();
        return (end + kValuesAlignment - 1) / kValuesAlignment * kValuesAlignment;
    }
    TIERKV_HD int64_t numel() const { return L * 2 * T * H * D; }
    TIERKV_HD int64_t nbytes() const { return values_offset() + numel(); }
    TIERKV_HD int64_t elem_size() const { return dtype == kDtypeF32 ? 4 : 2; }
};

TIERKV_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    return u;
#endif
}

TIERKV_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, 4);
    return x;
#endif
}

// float32 -> fp8 e4m3fn bits, round to nearest, ties to even, with e4m3 subnormals (m * 2**-9).
// Inputs the codec produces are already clamped to [-448, 448]. Outside that range it saturates as torch's
// conversions do (CPU in torch 2.13, and CUDA's satfinite mode): any larger magnitude, infinity included, gives
// +-448 (0x7e | sign), and NaN gives the NaN code 0x7f | sign.
// Written with integer operations only, so host and device give the same bits whatever the FPU modes are.
TIERKV_HD uint8_t fp8_e4m3_from_float(float x) {
    const uint32_t bits = float_bits(x);
    const uint32_t sign = (bits >> 24) & 0x80u;
    const uint32_t mag = bits & 0x7fffffffu;
    if (mag > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);  // NaN
    if (mag > 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // beyond 448, inf included: saturate
    const uint32_t exp = mag >> 23;
    if (exp < 121) {  // below 2**-6: an e4m3 subnormal (or zero); q = round_half_even(|x| * 2**9)
        if (exp == 0) return static_cast<uint8_t>(sign);  // float32 zero/denormal (< 2**-126): rounds to 0
        const uint32_t mant = (mag & 0x7fffffu) | 0x800000u;  // |x| = mant * 2**(exp - 150)
        const uint32_t shift = 141u - exp;                      // |x| * 2**9 = mant >> shift (+ remainder); >= 21
        if (shift > 24) return static_cast<uint8_t>(sign);      // < 2**-11 * ... : below half of 2**-9
        uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) ++q;  // q == 8 is the smallest normal, encoded as 0x08
        return static_cast<uint8_t>(sign | q);
    }
    // Normal: rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits, ties to even.
    uint32_t r = mag - (120u << 23);
    r += 0x7ffffu + ((r >> 20) & 1u);
    return static_cast<uint8_t>(sign | (r >> 20));
}

// fp8 e4m3fn bits -> float32 (exact). 0x7f / 0xff are NaN.
TIERKV_HD float fp8_e4m3_to_float(uint8_t q) {
    const uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
    const uint32_t e = (q >> 3) & 0xfu;
    const uint32_t m = q & 0x7u;
    if (e == 0xfu && m == 0x7u) return bits_float(sign | 0x7fc00000u);
    if (e == 0) {
        // m * 2**-9 exactly: m has at most 3 bits, so the product of two exact values is exact.
        const float v = static_cast<float>(m) * bits_float(0x3b000000u);  // 2**-9
        return bits_float(sign | float_bits(v));
    }
    return bits_float(sign | ((e + 120u) << 23) | (m << 20));
}

// Round to nearest, ties to even, as an int (the int8 codec's ``round``; inputs are within [-127, 127]).
TIERKV_HD int round_half_even(float y) {
#ifdef __CUDA_ARCH__
    return __float2int_rn(y);
#else
    return static_cast<int>(std::nearbyint(y));  // default rounding mode: to nearest even
#endif
}

// Launch the kernels on ``stream``; ``table`` is a device pointer to int64 [2, n] (sources, destinations).
// Returns the launch status (cudaGetLastError right after the launch).
cudaError_t launch_quantize(const Geometry& g, const int64_t* table, int64_t n, cudaStream_t stream);
cudaError_t launch_dequantize(const Geometry& g, const int64_t* table, int64_t n, cudaStream_t stream);

// cudaSuccess when the kernels' code loads on the current device (an image for its architecture exists, or
// PTX the driver can compile); otherwise the error that says why not.
cudaError_t kernel_image_status();

// The nvcc version the kernels were compiled with, e.g. "13.0".
const char* nvcc_version();

}  // namespace tierkv::cuda
