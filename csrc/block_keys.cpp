#include "block_keys.h"

#include <cstring>

#define XXH_INLINE_ALL
#include "xxhash.h"

namespace tierkv {

namespace {

// Tokens are hashed as little-endian uint32 on every machine, so keys agree across architectures.
inline void store_tokens_le32(uint8_t* dst, const uint32_t* src, size_t n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    std::memcpy(dst, src, 4 * n);
#else
    for (size_t t = 0; t < n; ++t) {
        const uint32_t v = src[t];
        dst[4 * t + 0] = static_cast<uint8_t>(v);
        dst[4 * t + 1] = static_cast<uint8_t>(v >> 8);
        dst[4 * t + 2] = static_cast<uint8_t>(v >> 16);
        dst[4 * t + 3] = static_cast<uint8_t>(v >> 24);
    }
#endif
}

// One step of the chain: message = [parent | tokens], parent slot already filled; writes the canonical key.
inline void hash_message(const uint8_t* message, size_t size, uint8_t key[kKeyBytes]) {
    const XXH128_hash_t digest = XXH3_128bits(message, size);
    XXH128_canonical_t canonical;
    XXH128_canonicalFromHash(&canonical, digest);
    std::memcpy(key, canonical.digest, kKeyBytes);
}

}  // namespace

// The message size as a compile-time constant: XXH3 inlines its one length class, with no branches on it.
template <size_t kBlockTokens>
inline void next_fixed(uint8_t* message, const uint32_t* block, uint8_t key[kKeyBytes]) {
    store_tokens_le32(message + kKeyBytes, block, kBlockTokens);
    hash_message(message, kKeyBytes + 4 * kBlockTokens, key);
    std::memcpy(message, key, kKeyBytes);
}

void BlockChain::next(const uint32_t* block, uint8_t key[kKeyBytes]) {
    uint8_t* message = message_.data();
    switch (block_tokens_) {  // the common block sizes
        case 16: return next_fixed<16>(message, block, key);
        case 32: return next_fixed<32>(message, block, key);
        default:
            store_tokens_le32(message + kKeyBytes, block, block_tokens_);
            hash_message(message, message_.size(), key);
            std::memcpy(message, key, kKeyBytes);  // this key is the next block's parent
    }
}

void block_keys(const uint32_t* tokens, size_t n_tokens, size_t block_tokens,
                const uint8_t root[kKeyBytes], uint8_t* out) {
    const size_t n_blocks = n_tokens / block_tokens;
    BlockChain chain(block_tokens, root);
    for (size_t b = 0; b < n_blocks; ++b) chain.next(tokens + b * block_tokens, out + b * kKeyBytes);
}

}  // namespace tierkv
