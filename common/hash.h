// FNV-1a, 64-bit: a small, stable, non-cryptographic hash for fingerprints and digests (a dataset
// file's bytes, a generation's drawn tokens). Not for bulk data: common/weight_sync.h hashes weights
// word-wise on several lanes instead.
#pragma once

#include <cstdint>
#include <string_view>

namespace aha {

inline constexpr uint64_t kFnv1a64Basis = 1469598103934665603ull;

// Continues hash h over `bytes` (start from kFnv1a64Basis).
inline uint64_t Fnv1a64(std::string_view bytes, uint64_t h = kFnv1a64Basis) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace aha
