// tierkv._C_cuda: the CUDA kernels of the lossy codecs. A separate module from tierkv._C so that importing tierkv
// (or using the CPU kernels) never loads CUDA code. cudart is linked statically: the module imports on a machine
// without a GPU or driver, and unusable_reason() says why the kernels cannot run there.
// No libtorch: Python passes device pointers, sizes and the cudaStream_t as integers.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "codec_cuda.h"

#ifndef TIERKV_CUDA_ARCHS
#define TIERKV_CUDA_ARCHS "unknown"
#endif

namespace nb = nanobind;
using tierkv::cuda::Geometry;

namespace {

constexpr int kMinComputeCapability = 80;

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

Geometry checked_geometry(int codec_id, int dtype_id, int64_t L, int64_t T, int64_t H, int64_t D) {
    if (codec_id != tierkv::cuda::kCodecFp8 && codec_id != tierkv::cuda::kCodecInt8)
        throw std::invalid_argument("expected codec_id 1 (fp8) or 2 (int8), got " + std::to_string(codec_id));
    if (dtype_id < tierkv::cuda::kDtypeF16 || dtype_id > tierkv::cuda::kDtypeF32)
        throw std::invalid_argument("expected dtype_id 1 (float16), 2 (bfloat16) or 3 (float32), got " +
                                    std::to_string(dtype_id));
    if (L < 1 || T < 1 || H < 1 || D < 1)
        throw std::invalid_argument("expected block dimensions L, T, H, D >= 1, got L=" + std::to_string(L) +
                                    " T=" + std::to_string(T) + " H=" + std::to_string(H) + " D=" +
                                    std::to_string(D));
    // A slab [T, H, D] is indexed with 32-bit ints in the kernels; a block must also fit easily in 64 bits.
    constexpr int64_t kMaxSlab = std::numeric_limits<int32_t>::max() / 8;
    if (T > kMaxSlab || H > kMaxSlab || D > kMaxSlab || T * H > kMaxSlab || T * H * D > kMaxSlab ||
        L > kMaxSlab)
        throw std::invalid_argument("expected T * H * D <= " + std::to_string(kMaxSlab) + " values per layer slab, got T=" +
                                    std::to_string(T) + " H=" + std::to_string(H) + " D=" + std::to_string(D));
    return Geometry{codec_id, dtype_id, L, T, H, D};
}

std::optional<std::string> unusable_reason() {
    int driver = 0;
    cudaDriverGetVersion(&driver);
    if (driver == 0) return std::string("no CUDA driver (libcuda.so.1 not found)");
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) cudaGetLastError();
    if (err == cudaErrorNoDevice || (err == cudaSuccess && count == 0)) return std::string("no CUDA device");
    if (err == cudaErrorInsufficientDriver)
        return "CUDA driver too old: it supports CUDA " + version_string(driver) + ", the kernels need " +
               version_string(CUDART_VERSION);
    if (err != cudaSuccess) return std::string("CUDA unavailable: ") + cudaGetErrorString(err);
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (major * 10 + minor < kMinComputeCapability)
        return "CUDA device " + std::to_string(dev) + " has compute capability " + std::to_string(major) + "." +
               std::to_string(minor) + "; the kernels need 8.0 or newer (built for " TIERKV_CUDA_ARCHS ")";
    const cudaError_t image = tierkv::cuda::kernel_image_status();
    if (image != cudaSuccess)
        return "the kernels do not load on CUDA device " + std::to_string(dev) + " (compute capability " +
               std::to_string(major) + "." + std::to_string(minor) + ", driver CUDA " + version_string(driver) +
               "): " + cudaGetErrorString(image);
    return std::nullopt;
}

std::string build_info() {
    return std::string("CUDA runtime ") + version_string(CUDART_VERSION) + " (static), nvcc " +
           tierkv::cuda::nvcc_version() + ", architectures " TIERKV_CUDA_ARCHS
           ", --fmad=false -prec-div=true -prec-sqrt=true -ftz=false";
}

void run(bool quantize, int codec_id, int dtype_id, int64_t L, int64_t T, int64_t H, int64_t D, uintptr_t table_ptr,
         int64_t n, uintptr_t stream) {
    const Geometry g = checked_geometry(codec_id, dtype_id, L, T, H, D);
    if (n < 0) throw std::invalid_argument("expected n >= 0 blocks, got " + std::to_string(n));
    if (n == 0) return;
    if (n * 2 * L > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("expected n * 2 * L <= 2**31 - 1 (one thread block per layer slab), got n=" +
                                    std::to_string(n) + " L=" + std::to_string(L));
    if (table_ptr == 0 || table_ptr % alignof(int64_t) != 0)
        throw std::invalid_argument("expected table_ptr to be an 8-byte aligned device pointer to int64 [2, n], got " +
                                    std::to_string(table_ptr));
    std::string failure;
    {
        nb::gil_scoped_release release;
        // The table must be GPU memory: a host pointer would fault inside the kernel and poison the context.
        cudaPointerAttributes attr{};
        cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(table_ptr));
        if (err != cudaSuccess) {
            cudaGetLastError();
            failure = std::string("cannot inspect table_ptr: ") + cudaGetErrorString(err);
        } else if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
            failure = "expected table_ptr to point to device memory, got " +
                      std::string(attr.type == cudaMemoryTypeHost ? "pinned host memory" : "unregistered host memory");
        } else {
            // Launch on the table's device (the stream belongs to it), then restore the caller's current device.
            int current = -1;
            cudaGetDevice(&current);
            if (current != attr.device) cudaSetDevice(attr.device);
            const auto* table = reinterpret_cast<const int64_t*>(table_ptr);
            auto s = reinterpret_cast<cudaStream_t>(stream);
            err = quantize ? tierkv::cuda::launch_quantize(g, table, n, s)
                           : tierkv::cuda::launch_dequantize(g, table, n, s);
            if (current >= 0 && current != attr.device) cudaSetDevice(current);
            if (err != cudaSuccess)
                failure = std::string(quantize ? "quantize" : "dequantize") + " launch failed: " +
                          cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
        }
    }
    if (!failure.empty()) {
        if (failure.rfind("expected", 0) == 0) throw std::invalid_argument(failure);
        throw std::runtime_error(failure);
    }
}

using FloatArray = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using ByteArray = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> owned_array(T* data, size_t n) {
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T, nb::ndim<1>>(data, {n}, owner);
}

nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>> encode_fp8_host(FloatArray x) {
    const size_t n = x.shape(0);
    auto* out = new uint8_t[n > 0 ? n : 1];
    for (size_t i = 0; i < n; ++i) out[i] = tierkv::cuda::fp8_e4m3_from_float(x(i));
    return owned_array(out, n);
}

nb::ndarray<nb::numpy, float, nb::ndim<1>> decode_fp8_host(ByteArray q) {
    const size_t n = q.shape(0);
    auto* out = new float[n > 0 ? n : 1];
    for (size_t i = 0; i < n; ++i) out[i] = tierkv::cuda::fp8_e4m3_to_float(q(i));
    return owned_array(out, n);
}

}  // namespace

NB_MODULE(_C_cuda, m) {
    m.doc() = "tierkv CUDA kernels of the lossy codecs (fp8 e4m3fn, int8); see tierkv/codec/format.py";
    m.def(
        "quantize",
        [](int codec_id, int dtype_id, int64_t L, int64_t T, int64_t H, int64_t D, uintptr_t table_ptr, int64_t n,
           uintptr_t stream) { run(true, codec_id, dtype_id, L, T, H, D, table_ptr, n, stream); },
        nb::arg("codec_id"), nb::arg("dtype_id"), nb::arg("L"), nb::arg("T"), nb::arg("H"), nb::arg("D"),
        nb::arg("table_ptr"), nb::arg("n"), nb::arg("stream"),
        "Enqueue on `stream` the encoding of n blocks [L, 2, T, H, D] of dtype_id into encoded rows (format v1).\n"
        "table_ptr: device int64 [2, n]: row 0 the n source block addresses, row 1 the n destination rows.\n"
        "Raises ValueError for bad arguments and RuntimeError when the launch fails.");
    m.def(
        "dequantize",
        [](int codec_id, int dtype_id, int64_t L, int64_t T, int64_t H, int64_t D, uintptr_t table_ptr, int64_t n,
           uintptr_t stream) { run(false, codec_id, dtype_id, L, T, H, D, table_ptr, n, stream); },
        nb::arg("codec_id"), nb::arg("dtype_id"), nb::arg("L"), nb::arg("T"), nb::arg("H"), nb::arg("D"),
        nb::arg("table_ptr"), nb::arg("n"), nb::arg("stream"),
        "Enqueue on `stream` the decoding of n encoded rows into blocks [L, 2, T, H, D] of dtype_id.\n"
        "table_ptr: device int64 [2, n]: row 0 the n encoded rows, row 1 the n destination blocks.");
    m.def(
        "encoded_nbytes",
        [](int codec_id, int64_t L, int64_t T, int64_t H, int64_t D) {
            return checked_geometry(codec_id, tierkv::cuda::kDtypeBF16, L, T, H, D).nbytes();
        },
        nb::arg("codec_id"), nb::arg("L"), nb::arg("T"), nb::arg("H"), nb::arg("D"),
        "Bytes of one encoded block (header, scales, padding, values).");
    m.def("build_info", &build_info, "CUDA version, architectures and floating-point flags of this build.");
    m.def("unusable_reason", &unusable_reason,
          "None when the current CUDA device can run the kernels; otherwise why not (one line).");
    m.def("encode_fp8_host", &encode_fp8_host, nb::arg("x"),
          "float32 -> fp8 e4m3fn bits with the kernels' own conversion, run on the host (for tests).");
    m.def("decode_fp8_host", &decode_fp8_host, nb::arg("q"),
          "fp8 e4m3fn bits -> float32 with the kernels' own conversion, run on the host (for tests).");
}
