// BPE: merge table, merge-priority word encoding, word cache.
#include "engine/tokenizer/bpe.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "common/check.h"

#include "engine/tokenizer/unicode.h"

namespace aha::tokenizer::internal {

MergeTable::Slot* MergeTable::Allocate(size_t n) {
  const size_t bytes = n * sizeof(Slot);
  const size_t huge = size_t{2} << 20;
  const size_t align = bytes >= huge ? huge : 64;
  const size_t rounded = (bytes + align - 1) / align * align;
  auto* p = static_cast<Slot*>(std::aligned_alloc(align, rounded));
  AHA_CHECK(p != nullptr) << "merge table of " << rounded << " bytes";
  if (align == huge) madvise(p, rounded, MADV_HUGEPAGE);  // advice only; failure is harmless
  std::uninitialized_fill_n(p, n, Slot{});
  return p;
}

void MergeTable::Reserve(size_t n) {
  // Load factor at most 2/3: a failed lookup (the common case) probes about 3 slots, which
  // usually share a cache line.
  size_t cap = 16;
  while (cap * 2 < n * 3) cap <<= 1;
  slots_.reset(Allocate(cap));
  capacity_ = cap;
  mask_ = cap - 1;
  size_ = 0;
}

bool MergeTable::Insert(int32_t left, int32_t right, int32_t rank, int32_t merged) {
  if (!slots_ || (size_ + 1) * 3 > capacity_ * 2) {
    std::unique_ptr<Slot[], Free> old = std::move(slots_);
    size_t old_capacity = capacity_;
    Reserve(std::max<size_t>((size_ + 1) * 2, 16));
    for (size_t i = 0; i < old_capacity; ++i)
      if (old[i].rank >= 0) Insert(static_cast<int32_t>(old[i].key >> 32), static_cast<int32_t>(old[i].key), old[i].rank, old[i].merged);
  }
  uint64_t key = Key(left, right);
  for (size_t i = Hash(key) & mask_;; i = (i + 1) & mask_) {
    Slot& s = slots_[i];
    if (s.rank < 0) {
      s = {key, rank, merged};
      ++size_;
      return true;
    }
    if (s.key == key) return false;
  }
}

bool WordCache::Find(uint64_t hash, std::string_view key, std::vector<int32_t>* out) const {
  hash |= 1;
  for (size_t i = hash & (kSlots - 1);; i = (i + 1) & (kSlots - 1)) {
    const Slot& s = slots_[i];
    if (s.hash == 0) return false;
    if (s.hash == hash && s.key_bytes == key.size() &&
        std::memcmp(arena_.data() + s.offset, key.data(), key.size()) == 0) {
      size_t at = out->size();
      out->resize(at + s.ids);
      std::memcpy(out->data() + at, arena_.data() + s.offset + s.key_bytes, s.ids * sizeof(int32_t));
      return true;
    }
  }
}

void WordCache::Insert(uint64_t hash, std::string_view key, const int32_t* ids, size_t n) {
  hash |= 1;
  size_t bytes = key.size() + n * sizeof(int32_t);
  if (key.size() > UINT16_MAX || n > UINT16_MAX || bytes > kArenaBytes) return;
  if ((used_ + 1) * 2 > kSlots || arena_.size() + bytes > kArenaBytes) {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    arena_.clear();
    used_ = 0;
  }
  size_t i = hash & (kSlots - 1);
  while (slots_[i].hash != 0) {
    if (slots_[i].hash == hash && slots_[i].key_bytes == key.size() &&
        std::memcmp(arena_.data() + slots_[i].offset, key.data(), key.size()) == 0)
      return;  // another thread inserted it meanwhile
    i = (i + 1) & (kSlots - 1);
  }
  Slot& s = slots_[i];
  s = {hash, static_cast<uint32_t>(arena_.size()), static_cast<uint16_t>(key.size()), static_cast<uint16_t>(n)};
  arena_.insert(arena_.end(), key.begin(), key.end());
  const char* raw = reinterpret_cast<const char*>(ids);
  arena_.insert(arena_.end(), raw, raw + n * sizeof(int32_t));
  ++used_;
}

BpeModel::BpeModel(StringIdMap vocab, MergeTable merges, BpeOptions options)
    : vocab_(std::move(vocab)), merges_(std::move(merges)), options_(options),
      cache_(new Shard[kCacheShards]) {
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(std::string_view(reinterpret_cast<const char*>(&b), 1));
    byte_ids_[b] = options_.byte_level && it != vocab_.end() ? it->second : -1;
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto fb = vocab_.find(std::string_view(name));
    fallback_ids_[b] = fb != vocab_.end() ? fb->second : -1;
  }
}

void BpeModel::InitialSymbols(std::string_view piece, std::vector<int32_t>* ids) const {
  bool last_unk = false;
  auto push_unknown = [&](std::string_view symbol) {
    if (options_.byte_fallback) {
      bool all = true;
      for (unsigned char b : symbol) all = all && fallback_ids_[b] >= 0;
      if (all) {
        for (unsigned char b : symbol) ids->push_back(fallback_ids_[b]);
        last_unk = false;
        return;
      }
    }
    if (options_.unk_id < 0) return;  // no unknown token: the symbol is dropped, as upstream
    if (!(options_.fuse_unk && last_unk)) ids->push_back(options_.unk_id);
    last_unk = true;
  };
  if (options_.byte_level) {
    for (size_t i = 0; i < piece.size(); ++i) {
      int32_t id = byte_ids_[static_cast<unsigned char>(piece[i])];
      if (id >= 0) {
        ids->push_back(id);
        last_unk = false;
      } else {
        push_unknown(piece.substr(i, 1));
      }
    }
    return;
  }
  size_t pos = 0;
  while (pos < piece.size()) {
    size_t begin = pos;
    pos += Utf8Length(static_cast<unsigned char>(piece[pos]));
    pos = std::min(pos, piece.size());
    std::string_view symbol = piece.substr(begin, pos - begin);
    auto it = vocab_.find(symbol);
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      last_unk = false;
    } else {
      push_unknown(symbol);
    }
  }
}

void BpeModel::MergeAll(std::vector<int32_t>* ids) const {
  const size_t n = ids->size();
  if (n < 2) return;
  struct Sym {
    int32_t id, prev, next;
  };
  struct Merge {
    int32_t rank, pos, merged, left, right;  // left/right: the pair's ids when pushed
    // std::push_heap builds a max-heap: "greater" puts the lowest (rank, pos) on top.
    bool operator<(const Merge& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  thread_local std::vector<Sym> syms;
  thread_local std::vector<Merge> heap;
  syms.resize(n);
  heap.clear();
  for (size_t i = 0; i < n; ++i) {
    syms[i] = {(*ids)[i], static_cast<int32_t>(i) - 1, i + 1 < n ? static_cast<int32_t>(i + 1) : -1};
  }
  for (size_t i = 0; i + 1 < n; ++i) merges_.Prefetch(syms[i].id, syms[i + 1].id);
  for (size_t i = 0; i + 1 < n; ++i) {
    auto [rank, merged] = merges_.Find(syms[i].id, syms[i + 1].id);
    if (rank >= 0) heap.push_back({rank, static_cast<int32_t>(i), merged, syms[i].id, syms[i + 1].id});
  }
  std::make_heap(heap.begin(), heap.end());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    Merge top = heap.back();
    heap.pop_back();
    Sym& left = syms[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    Sym& right = syms[left.next];
    // A stale entry: one side has merged since it was pushed. (Ids only grow into new tokens, so
    // equal ids mean the same pair, and the same merge.)
    if (left.id != top.left || right.id != top.right) continue;
    left.id = top.merged;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) syms[left.next].prev = top.pos;
    if (left.prev >= 0 && left.next >= 0) merges_.Prefetch(left.id, syms[left.next].id);
    if (left.prev >= 0) {
      int32_t p = syms[left.prev].id;
      auto [r, m] = merges_.Find(p, left.id);
      if (r >= 0) {
        heap.push_back({r, left.prev, m, p, left.id});
        std::push_heap(heap.begin(), heap.end());
      }
    }
    if (left.next >= 0) {
      int32_t q = syms[left.next].id;
      auto [r, m] = merges_.Find(left.id, q);
      if (r >= 0) {
        heap.push_back({r, top.pos, m, left.id, q});
        std::push_heap(heap.begin(), heap.end());
      }
    }
  }
  ids->clear();
  for (int32_t i = 0; i >= 0; i = syms[i].next) ids->push_back(syms[i].id);
}

void BpeModel::EncodeUncached(std::string_view piece, std::vector<int32_t>* out) const {
  if (piece.empty()) return;
  if (options_.ignore_merges) {
    auto it = vocab_.find(piece);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  thread_local std::vector<int32_t> ids;
  ids.clear();
  InitialSymbols(piece, &ids);
  MergeAll(&ids);
  out->insert(out->end(), ids.begin(), ids.end());
}

void BpeModel::Encode(std::string_view piece, std::vector<int32_t>* out) const {
  if (piece.empty()) return;
  if (piece.size() > kMaxCachedPieceBytes) {
    EncodeUncached(piece, out);
    return;
  }
  uint64_t hash = StringHash{}(piece);
  Shard& shard = cache_[(hash >> 40) % kCacheShards];
  lookups_.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(shard.mu);
    if (shard.words.Find(hash, piece, out)) {
      hits_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
  }
  size_t first = out->size();
  EncodeUncached(piece, out);
  std::lock_guard<std::mutex> lock(shard.mu);
  shard.words.Insert(hash, piece, out->data() + first, out->size() - first);
}

}  // namespace aha::tokenizer::internal
