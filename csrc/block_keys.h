// Chained prefix keys for KV-cache blocks (the derivation is specified in docs/architecture.md).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tierkv {

constexpr size_t kKeyBytes = 16;

// key[i] = XXH3_128(key[i-1] || tokens of block i as little-endian uint32), key[-1] = root,
// each digest in xxhash's canonical (big-endian) 16-byte form.
// tokens: n_tokens values; a partial tail block gets no key.
// out: room for (n_tokens / block_tokens) * kKeyBytes bytes.
void block_keys(const uint32_t* tokens, size_t n_tokens, size_t block_tokens,
                const uint8_t root[kKeyBytes], uint8_t* out);

// The same chain one block at a time, for walks that stop early (a miss at block 0 costs one hash).
// Holds the message buffer [parent key | block tokens] so that no step allocates.
class BlockChain {
public:
    BlockChain(size_t block_tokens, const uint8_t root[kKeyBytes])
        : block_tokens_(block_tokens), message_(kKeyBytes + 4 * block_tokens) {
        std::memcpy(message_.data(), root, kKeyBytes);
    }

    // Hashes the next block (block_tokens tokens) into key; key becomes the parent of the block after it.
    void next(const uint32_t* block, uint8_t key[kKeyBytes]);

    size_t block_tokens() const { return block_tokens_; }

private:
    size_t block_tokens_;
    std::vector<uint8_t> message_;
};

}  // namespace tierkv
