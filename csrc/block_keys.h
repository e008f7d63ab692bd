// Chained prefix keys for KV-cache blocks (the derivation is specified in docs/architecture.md).
#pragma once
#include <cstddef>
#include <cstdint>

namespace tierkv {

constexpr size_t kKeyBytes = 16;

// key[i] = XXH3_128(key[i-1] || tokens of block i as little-endian uint32), key[-1] = root,
// each digest in xxhash's canonical (big-endian) 16-byte form.
// tokens: n_tokens values; a partial tail block gets no key.
// out: room for (n_tokens / block_tokens) * kKeyBytes bytes.
void block_keys(const uint32_t* tokens, size_t n_tokens, size_t block_tokens,
                const uint8_t root[kKeyBytes], uint8_t* out);

}  // namespace tierkv
