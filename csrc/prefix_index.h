// The native prefix index: 16-byte block keys -> 32-bit location, and longest-prefix walks in one call.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <shared_mutex>

#include "block_keys.h"

namespace tierkv {

// Open addressing with linear probing over 16-byte keys. The keys are xxh3-128 digests, uniformly random
// already, so a slot's home is the key's first 8 bytes read as a little-endian uint64, modulo the (power of
// two) capacity: no rehash. Value 0 marks an empty slot, so valid values are [1, 2^31). The table doubles
// when it would pass a load factor of 5/8; deletion shifts the rest of the cluster back (no tombstones).
//
// Not synchronized: PrefixIndex (the Python class) wraps one of these in a std::shared_mutex.
class KeyTable {
public:
    static constexpr uint32_t kMaxValue = 0x7fffffffu;  // values are in [1, kMaxValue]

    struct Key {
        uint64_t lo;  // key bytes [0, 8) as little-endian: the hash
        uint64_t hi;  // key bytes [8, 16)
        bool operator==(const Key& o) const { return lo == o.lo && hi == o.hi; }
    };

    static Key load_key(const uint8_t* bytes) {
        Key k;
        k.lo = load_le64(bytes);
        k.hi = load_le64(bytes + 8);
        return k;
    }

    explicit KeyTable(size_t expected_keys = 1024);

    uint32_t get(const Key& key) const {
        size_t i = home(key);
        for (;;) {
            const Slot& s = slots_[i];
            if (s.value == 0) return 0;
            if (s.key == key) return s.value;
            i = (i + 1) & mask_;
        }
    }
    // Hints the CPU to fetch the key's home slot (the start of its probe sequence).
    void prefetch(const Key& key) const {
        const Slot* s = &slots_[home(key)];
        __builtin_prefetch(s);
        __builtin_prefetch(reinterpret_cast<const char*>(s) + sizeof(Slot) - 1);
    }
    void set(const Key& key, uint32_t value);  // value in [1, kMaxValue]
    bool discard(const Key& key);
    void clear();
    size_t size() const { return size_; }
    size_t capacity() const { return mask_ + 1; }

private:
    struct Slot {
        Key key;
        uint32_t value;  // 0: empty
        uint32_t pad_;
    };

    static uint64_t load_le64(const uint8_t* p) {
        uint64_t v;
        std::memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
#endif
        return v;
    }
    size_t home(const Key& key) const { return static_cast<size_t>(key.lo) & mask_; }
    void allocate(size_t capacity);
    void grow();

    std::unique_ptr<Slot[]> slots_;
    size_t mask_ = 0;
    size_t size_ = 0;
    size_t grow_at_ = 0;  // size at which the next insert doubles the table
    size_t initial_capacity_ = 0;
};

// The longest prefix of keys present in table, hashing block after block from tokens (the block_keys chain)
// and stopping at the first absent key: a miss at block 0 costs one hash. Hashes a few blocks ahead of the
// lookups (1, 2, 4, then 8 at a time) and prefetches their slots so that memory latency overlaps hashing.
size_t longest_prefix_tokens(const KeyTable& table, const uint32_t* tokens, size_t n_tokens, size_t block_tokens,
                             const uint8_t root[kKeyBytes]);

// The longest prefix of n packed 16-byte keys present in table.
size_t longest_prefix_packed(const KeyTable& table, const uint8_t* keys, size_t n);

}  // namespace tierkv
