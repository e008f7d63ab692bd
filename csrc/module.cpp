// tierkv._C: the native fast paths. Python reaches them only through tierkv/ops.py.
// No libtorch here: callers pass plain buffers, so one build works with any torch version.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <stdexcept>
#include <string>

#include "bindings.h"
#include "block_keys.h"

namespace nb = nanobind;

namespace {

using TokenArray = nb::ndarray<const uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

std::string compute_keys(TokenArray tokens, size_t block_tokens, nb::bytes root) {
    if (block_tokens == 0) throw std::invalid_argument("expected block_tokens >= 1, got 0");
    if (root.size() != tierkv::kKeyBytes)
        throw std::invalid_argument("expected a 16-byte root key, got " + std::to_string(root.size()) +
                                    " bytes");
    const size_t n_tokens = tokens.shape(0);
    std::string out((n_tokens / block_tokens) * tierkv::kKeyBytes, '\0');
    const auto* root_bytes = reinterpret_cast<const uint8_t*>(root.c_str());
    {
        nb::gil_scoped_release release;
        tierkv::block_keys(tokens.data(), n_tokens, block_tokens, root_bytes,
                           reinterpret_cast<uint8_t*>(out.data()));
    }
    return out;
}

nb::bytes block_keys_packed_py(TokenArray tokens, size_t block_tokens, nb::bytes root) {
    const std::string packed = compute_keys(tokens, block_tokens, root);
    return nb::bytes(packed.data(), packed.size());
}

// One Python bytes object per key, built here: slicing a packed result in Python costs more than hashing.
// Allocating 8192 small objects costs about as much as hashing them, so each digest is written straight into
// its (not yet shared) bytes object, with no packed intermediate and no copy.
nb::list block_keys_py(TokenArray tokens, size_t block_tokens, nb::bytes root) {
    if (block_tokens == 0) throw std::invalid_argument("expected block_tokens >= 1, got 0");
    if (root.size() != tierkv::kKeyBytes)
        throw std::invalid_argument("expected a 16-byte root key, got " + std::to_string(root.size()) +
                                    " bytes");
    const size_t n_blocks = tokens.shape(0) / block_tokens;
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(n_blocks));
    if (list == nullptr) throw nb::python_error();
    nb::list result = nb::steal<nb::list>(list);
    const uint32_t* data = tokens.data();
    tierkv::BlockChain chain(block_tokens, reinterpret_cast<const uint8_t*>(root.c_str()));
    for (size_t b = 0; b < n_blocks; ++b) {
        PyObject* key = PyBytes_FromStringAndSize(nullptr, tierkv::kKeyBytes);
        if (key == nullptr) throw nb::python_error();
        chain.next(data + b * block_tokens, reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(key)));
        PyList_SET_ITEM(list, static_cast<Py_ssize_t>(b), key);  // steals the reference
    }
    return result;
}

}  // namespace

NB_MODULE(_C, m) {
    m.doc() = "tierkv native core (CPU)";
    m.def("block_keys", &block_keys_py, nb::arg("tokens"), nb::arg("block_tokens"), nb::arg("root"),
          "Chained xxh3-128 block keys of a uint32 token array: a list of 16-byte keys, one per full block.");
    m.def("block_keys_packed", &block_keys_packed_py, nb::arg("tokens"), nb::arg("block_tokens"), nb::arg("root"),
          "The same keys concatenated: (len(tokens) // block_tokens) * 16 bytes.");
    tierkv::bind_codec(m);
    tierkv::bind_prefix_index(m);
}
