// Byte-pair encoding of one pre-tokenized piece (internal).
//
// Merge-priority algorithm (as Hugging Face's `Word::merge_all`): the piece starts as one symbol
// per byte (byte-level) or per character; a min-heap holds every adjacent pair that has a merge,
// keyed by (rank, position); the lowest is applied, its neighbours' pairs are pushed, and stale
// heap entries are skipped. O(n log n) for a piece of n symbols. Results of pieces up to
// kMaxCachedPieceBytes are kept in a word cache (16 locked shards of WordCache, 12 MiB at most),
// so frequent words cost one hash lookup.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace aha::tokenizer::internal {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringIdMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// (left id, right id) -> (rank, merged id), open addressing.
class MergeTable {
 public:
  void Reserve(size_t n);
  // False if the pair is already present (the first, lowest rank wins).
  bool Insert(int32_t left, int32_t right, int32_t rank, int32_t merged);
  // Rank and merged id, or rank -1.
  std::pair<int32_t, int32_t> Find(int32_t left, int32_t right) const {
    if (!slots_) return {-1, -1};
    uint64_t key = Key(left, right);
    for (size_t i = Hash(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.rank < 0) return {-1, -1};
      if (s.key == key) return {s.rank, s.merged};
    }
  }
  size_t size() const { return size_; }
  // Starts loading the slot of a pair into cache (lookups are memory-bound on a 150k-merge table;
  // issuing a word's lookups together overlaps their misses).
  void Prefetch(int32_t left, int32_t right) const {
    if (slots_) __builtin_prefetch(&slots_[Hash(Key(left, right)) & mask_]);
  }

 private:
  struct Slot {
    uint64_t key = 0;
    int32_t rank = -1;
    int32_t merged = -1;
  };
  static uint64_t Key(int32_t l, int32_t r) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(l)) << 32) | static_cast<uint32_t>(r);
  }
  static uint64_t Hash(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
  }
  struct Free {
    void operator()(Slot* p) const { std::free(p); }
  };
  // Slots live in memory the kernel may back with huge pages: a 4 MiB table probed at random
  // otherwise costs a TLB miss on most lookups.
  static Slot* Allocate(size_t n);
  std::unique_ptr<Slot[], Free> slots_;
  size_t capacity_ = 0, mask_ = 0, size_ = 0;
};

// Piece -> ids, open addressing over one byte arena (no allocation per entry; one probe is
// usually one cache line). Not thread-safe: BpeModel locks a shard around it. When the slots are
// half full or the arena is full, everything is dropped and refilled: frequent words return at
// once, and memory stays bounded (kSlots * 16 B + kArenaBytes).
class WordCache {
 public:
  static constexpr size_t kSlots = 1 << 14;
  static constexpr size_t kArenaBytes = 1 << 19;

  WordCache() : slots_(kSlots) { arena_.reserve(kArenaBytes); }
  // Appends the cached ids of `key` to `out`; false when absent.
  bool Find(uint64_t hash, std::string_view key, std::vector<int32_t>* out) const;
  void Insert(uint64_t hash, std::string_view key, const int32_t* ids, size_t n);

 private:
  struct Slot {
    uint64_t hash = 0;  // 0: empty (stored hashes have their low bit set)
    uint32_t offset = 0;
    uint16_t key_bytes = 0;
    uint16_t ids = 0;
  };
  std::vector<Slot> slots_;
  std::vector<char> arena_;
  size_t used_ = 0;
};

struct BpeOptions {
  bool byte_level = true;  // initial symbols are bytes, else UTF-8 characters
  bool ignore_merges = false;
  int32_t unk_id = -1;
  bool fuse_unk = false;
  bool byte_fallback = false;
};

class BpeModel {
 public:
  static constexpr size_t kMaxCachedPieceBytes = 256;
  static constexpr size_t kCacheShards = 16;

  // `vocab` maps symbol strings (raw bytes when byte_level) to ids.
  BpeModel(StringIdMap vocab, MergeTable merges, BpeOptions options);

  // Appends the ids of `piece`.
  void Encode(std::string_view piece, std::vector<int32_t>* out) const;
  // The same without the cache (tests compare the two).
  void EncodeUncached(std::string_view piece, std::vector<int32_t>* out) const;

  uint64_t cache_hits() const { return hits_.load(std::memory_order_relaxed); }
  uint64_t cache_lookups() const { return lookups_.load(std::memory_order_relaxed); }

 private:
  void InitialSymbols(std::string_view piece, std::vector<int32_t>* ids) const;
  void MergeAll(std::vector<int32_t>* ids) const;

  StringIdMap vocab_;
  MergeTable merges_;
  BpeOptions options_;
  std::array<int32_t, 256> byte_ids_;
  std::array<int32_t, 256> fallback_ids_;  // "<0xAB>" tokens

  struct Shard {
    std::mutex mu;
    WordCache words;
  };
  mutable std::unique_ptr<Shard[]> cache_;
  mutable std::atomic<uint64_t> hits_{0}, lookups_{0};
};

}  // namespace aha::tokenizer::internal
