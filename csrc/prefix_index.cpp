// The native prefix index: 16-byte keys -> location, longest-prefix walks in one call.
//
// Thread safety (the Python class): one std::shared_mutex per index, readers shared, writers exclusive.
// Lock ordering with the GIL: nothing touches a Python object while holding the mutex, and no thread ever
// *blocks* on the mutex while holding the GIL. Short operations first try the mutex with the GIL held (no
// waiting, so no GIL hand-off on the fast path); when that fails they release the GIL, then block. The long
// walks always release the GIL before they take the mutex. Everything a walk reads (keys copied out of a
// list, an immutable bytes object, a numpy buffer kept alive by the call) stays valid without the GIL.
#include "prefix_index.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"

namespace nb = nanobind;

namespace tierkv {

// ---------------------------------------------------------------------------------------------------------------
// KeyTable

KeyTable::KeyTable(size_t expected_keys) {
    // Room for expected_keys below the 5/8 load factor.
    const size_t need = expected_keys + expected_keys / 2 + expected_keys / 8 + 1;
    size_t capacity = 16;
    while (capacity < need) {
        if (capacity > (std::numeric_limits<size_t>::max() >> 2)) throw std::bad_alloc();
        capacity <<= 1;
    }
    initial_capacity_ = capacity;
    allocate(capacity);
}

void KeyTable::allocate(size_t capacity) {
    if (capacity > std::numeric_limits<size_t>::max() / sizeof(Slot)) throw std::bad_alloc();
    slots_.reset(new Slot[capacity]());  // value-initialized: every slot empty
    mask_ = capacity - 1;
    size_ = 0;
    grow_at_ = capacity / 8 * 5;
}

void KeyTable::grow() {
    std::unique_ptr<Slot[]> old = std::move(slots_);
    const size_t old_capacity = mask_ + 1;
    const size_t count = size_;
    allocate(old_capacity * 2);
    for (size_t i = 0; i < old_capacity; ++i) {
        const Slot& s = old[i];
        if (s.value == 0) continue;
        size_t j = home(s.key);
        while (slots_[j].value != 0) j = (j + 1) & mask_;
        slots_[j] = s;
    }
    size_ = count;
}

void KeyTable::set(const Key& key, uint32_t value) {
    size_t i = home(key);
    for (;;) {
        Slot& s = slots_[i];
        if (s.value == 0) break;
        if (s.key == key) {
            s.value = value;
            return;
        }
        i = (i + 1) & mask_;
    }
    if (size_ + 1 > grow_at_) {
        grow();
        i = home(key);
        while (slots_[i].value != 0) i = (i + 1) & mask_;
    }
    slots_[i].key = key;
    slots_[i].value = value;
    ++size_;
}

bool KeyTable::discard(const Key& key) {
    size_t hole = home(key);
    for (;;) {
        const Slot& s = slots_[hole];
        if (s.value == 0) return false;
        if (s.key == key) break;
        hole = (hole + 1) & mask_;
    }
    // Backward shift: walk the rest of the cluster and move back every entry whose home is not cyclically
    // in (hole, j], i.e. every entry the hole would otherwise cut off from its home.
    size_t j = hole;
    for (;;) {
        j = (j + 1) & mask_;
        const Slot& s = slots_[j];
        if (s.value == 0) break;
        const size_t h = home(s.key);
        const bool reachable = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
        if (!reachable) {
            slots_[hole] = s;
            hole = j;
        }
    }
    slots_[hole].value = 0;
    --size_;
    return true;
}

void KeyTable::clear() { allocate(initial_capacity_); }

// ---------------------------------------------------------------------------------------------------------------
// walks

size_t longest_prefix_tokens(const KeyTable& table, const uint32_t* tokens, size_t n_tokens, size_t block_tokens,
                             const uint8_t root[kKeyBytes]) {
    const size_t n_blocks = n_tokens / block_tokens;
    if (n_blocks == 0 || table.size() == 0) return 0;
    BlockChain chain(block_tokens, root);
    constexpr size_t kMaxAhead = 8;
    KeyTable::Key ahead[kMaxAhead];
    uint8_t digest[kKeyBytes];
    size_t done = 0;
    size_t batch = 1;  // 1, 2, 4, then 8: an early miss wastes few hashes, a long hit overlaps memory latency
    while (done < n_blocks) {
        const size_t m = std::min(batch, n_blocks - done);
        for (size_t j = 0; j < m; ++j) {
            chain.next(tokens + (done + j) * block_tokens, digest);
            ahead[j] = KeyTable::load_key(digest);
            table.prefetch(ahead[j]);
        }
        for (size_t j = 0; j < m; ++j)
            if (table.get(ahead[j]) == 0) return done + j;
        done += m;
        batch = std::min(batch * 2, kMaxAhead);
    }
    return n_blocks;
}

size_t longest_prefix_packed(const KeyTable& table, const uint8_t* keys, size_t n) {
    if (table.size() == 0) return 0;
    constexpr size_t kAhead = 8;
    for (size_t i = 0; i < std::min(n, kAhead); ++i) table.prefetch(KeyTable::load_key(keys + i * kKeyBytes));
    for (size_t i = 0; i < n; ++i) {
        if (i + kAhead < n) table.prefetch(KeyTable::load_key(keys + (i + kAhead) * kKeyBytes));
        if (table.get(KeyTable::load_key(keys + i * kKeyBytes)) == 0) return i;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------------------------
// Python binding

namespace {

using TokenArray = nb::ndarray<const uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using SharedLock = std::shared_lock<std::shared_mutex>;
using UniqueLock = std::unique_lock<std::shared_mutex>;

std::string py_type_name(nb::handle h) { return Py_TYPE(h.ptr())->tp_name; }

const uint8_t* key_bytes(nb::handle h) {
    if (!PyBytes_Check(h.ptr())) throw nb::type_error(("expected a key as bytes, got " + py_type_name(h)).c_str());
    const Py_ssize_t size = PyBytes_GET_SIZE(h.ptr());
    if (size != static_cast<Py_ssize_t>(kKeyBytes))
        throw nb::value_error(("expected a 16-byte key, got " + std::to_string(size) + " bytes").c_str());
    return reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(h.ptr()));
}

uint32_t checked_value(nb::handle h) {
    if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr()))
        throw nb::type_error(("expected an int value, got " + py_type_name(h)).c_str());
    nb::object index = nb::steal(PyNumber_Index(h.ptr()));
    if (!index.is_valid()) throw nb::python_error();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (v == -1 && PyErr_Occurred()) throw nb::python_error();
    if (overflow != 0 || v < 1 || v > static_cast<long long>(KeyTable::kMaxValue))
        throw nb::value_error(
            ("expected a value in [1, 2**31), got " + std::string(nb::repr(index).c_str())).c_str());
    return static_cast<uint32_t>(v);
}

class PrefixIndex {
public:
    explicit PrefixIndex(long long expected_keys) : table_(checked_expected(expected_keys)) {}

    void set(nb::handle key, nb::handle value) {
        const KeyTable::Key k = KeyTable::load_key(key_bytes(key));
        const uint32_t v = checked_value(value);
        locked<UniqueLock>([&] {
            table_.set(k, v);
            return 0;
        });
    }
    bool discard(nb::handle key) {
        const KeyTable::Key k = KeyTable::load_key(key_bytes(key));
        return locked<UniqueLock>([&] { return table_.discard(k); });
    }
    uint32_t get(nb::handle key) const {
        const KeyTable::Key k = KeyTable::load_key(key_bytes(key));
        return locked<SharedLock>([&] { return table_.get(k); });
    }
    bool contains(nb::handle key) const { return get(key) != 0; }
    size_t size() const {
        return locked<SharedLock>([&] { return table_.size(); });
    }
    size_t capacity() const {
        return locked<SharedLock>([&] { return table_.capacity(); });
    }
    void clear() {
        locked<UniqueLock>([&] {
            table_.clear();
            return 0;
        });
    }

    size_t longest_prefix(nb::handle keys) const {
        // Copy (and validate) every key while holding the GIL: the list may change once it is released.
        nb::object seq = nb::steal(PySequence_Fast(keys.ptr(), "expected a sequence of 16-byte keys"));
        if (!seq.is_valid()) throw nb::python_error();
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
        PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
        std::vector<uint8_t> packed(static_cast<size_t>(n) * kKeyBytes);
        for (Py_ssize_t i = 0; i < n; ++i) std::memcpy(&packed[i * kKeyBytes], key_bytes(items[i]), kKeyBytes);
        nb::gil_scoped_release release;
        SharedLock lock(mutex_);
        return longest_prefix_packed(table_, packed.data(), static_cast<size_t>(n));
    }

    size_t longest_prefix_packed_py(nb::bytes packed) const {
        const size_t n = packed.size();
        if (n % kKeyBytes != 0)
            throw nb::value_error(("expected packed keys of a multiple of 16 bytes, got " + std::to_string(n) +
                                   " bytes").c_str());
        const auto* data = reinterpret_cast<const uint8_t*>(packed.c_str());  // immutable, kept alive by the call
        nb::gil_scoped_release release;
        SharedLock lock(mutex_);
        return longest_prefix_packed(table_, data, n / kKeyBytes);
    }

    size_t longest_prefix_tokens_py(TokenArray tokens, long long block_tokens, nb::bytes root) const {
        if (block_tokens < 1)
            throw nb::value_error(("expected block_tokens >= 1, got " + std::to_string(block_tokens)).c_str());
        if (root.size() != kKeyBytes)
            throw nb::value_error(
                ("expected a 16-byte root key, got " + std::to_string(root.size()) + " bytes").c_str());
        const auto* root_bytes = reinterpret_cast<const uint8_t*>(root.c_str());
        const uint32_t* data = tokens.data();
        const size_t n_tokens = tokens.shape(0);
        nb::gil_scoped_release release;
        SharedLock lock(mutex_);
        return longest_prefix_tokens(table_, data, n_tokens, static_cast<size_t>(block_tokens), root_bytes);
    }

private:
    static size_t checked_expected(long long expected_keys) {
        if (expected_keys < 0 || expected_keys > (1LL << 32))
            throw nb::value_error(
                ("expected expected_keys in [0, 2**32], got " + std::to_string(expected_keys)).c_str());
        return static_cast<size_t>(expected_keys);
    }

    // Runs fn (which must not touch Python) under the mutex without ever blocking on it while holding the GIL:
    // try first with the GIL held; on contention release the GIL, then wait.
    template <class Lock, class Fn>
    auto locked(Fn&& fn) const -> decltype(fn()) {
        {
            Lock lock(mutex_, std::try_to_lock);
            if (lock.owns_lock()) return fn();
        }
        nb::gil_scoped_release release;
        Lock lock(mutex_);  // declared after release: unlocked before the GIL is taken back
        return fn();
    }

    KeyTable table_;
    mutable std::shared_mutex mutex_;
};

}  // namespace

void bind_prefix_index(nb::module_& m) {
    nb::class_<PrefixIndex>(m, "PrefixIndex",
                            "16-byte block keys -> int location in [1, 2**31) (open addressing, linear probing), "
                            "with longest-prefix walks in one call. Safe under concurrent threads.")
        .def(nb::init<long long>(), nb::arg("expected_keys") = 1024)
        .def("set", &PrefixIndex::set, nb::arg("key").none(), nb::arg("value").none(),
             "Map key (16 bytes) to value in [1, 2**31), replacing any previous value.")
        .def("discard", &PrefixIndex::discard, nb::arg("key").none(), "Remove key; True when it was present.")
        .def("get", &PrefixIndex::get, nb::arg("key").none(), "The key's value, 0 when absent.")
        .def("__contains__", &PrefixIndex::contains, nb::arg("key").none())
        .def("__len__", &PrefixIndex::size)
        .def("clear", &PrefixIndex::clear, "Remove every key.")
        .def_prop_ro("capacity", &PrefixIndex::capacity, "Slots in the table (a power of two).")
        .def("longest_prefix", &PrefixIndex::longest_prefix, nb::arg("keys").none(),
             "How many leading keys of a sequence of 16-byte keys are present.")
        .def("longest_prefix_packed", &PrefixIndex::longest_prefix_packed_py, nb::arg("packed"),
             "How many leading keys of concatenated 16-byte keys are present.")
        .def("longest_prefix_tokens", &PrefixIndex::longest_prefix_tokens_py, nb::arg("tokens"),
             nb::arg("block_tokens"), nb::arg("root"),
             "How many leading block keys of a uint32 token array (the block_keys chain from root) are present; "
             "hashes only up to the first absent key.");
}

}  // namespace tierkv
