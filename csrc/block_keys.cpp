#include "block_keys.h"

#include <cstring>
#include <vector>

#define XXH_INLINE_ALL
#include "xxhash.h"

namespace tierkv {

namespace {

// Tokens are hashed as little-endian uint32 on every machine, so keys agree across architectures.
inline void store_le32(uint8_t* dst, uint32_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    std::memcpy(dst, &v, 4);
#else
    dst[0] = static_cast<uint8_t>(v);
    dst[1] = static_cast<uint8_t>(v >> 8);
    dst[2] = static_cast<uint8_t>(v >> 16);
    dst[3] = static_cast<uint8_t>(v >> 24);
#endif
}

}  // namespace

void block_keys(const uint32_t* tokens, size_t n_tokens, size_t block_tokens,
                const uint8_t root[kKeyBytes], uint8_t* out) {
    const size_t n_blocks = n_tokens / block_tokens;
    const size_t token_bytes = block_tokens * 4;
    // One message buffer reused for every block: [parent key | block tokens].
    std::vector<uint8_t> message(kKeyBytes + token_bytes);
    std::memcpy(message.data(), root, kKeyBytes);
    for (size_t b = 0; b < n_blocks; ++b) {
        const uint32_t* block = tokens + b * block_tokens;
        uint8_t* body = message.data() + kKeyBytes;
        for (size_t t = 0; t < block_tokens; ++t) store_le32(body + 4 * t, block[t]);
        const XXH128_hash_t digest = XXH3_128bits(message.data(), message.size());
        XXH128_canonical_t canonical;
        XXH128_canonicalFromHash(&canonical, digest);
        uint8_t* key = out + b * kKeyBytes;
        std::memcpy(key, canonical.digest, kKeyBytes);
        std::memcpy(message.data(), key, kKeyBytes);  // this key is the next block's parent
    }
}

}  // namespace tierkv
