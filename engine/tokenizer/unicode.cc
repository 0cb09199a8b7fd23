// UTF-8 validation and repair (WHATWG decoder), character classes, GPT-2 byte-level map.
#include "engine/tokenizer/unicode.h"

#include <utf8proc.h>

#include "engine/tokenizer/tokenizer.h"

namespace aha::tokenizer {
namespace {

// Runs the WHATWG UTF-8 decoder over `s`; appends valid sequences and U+FFFD for errors to `out`
// when it is not null. Returns whether `s` had no error.
bool DecodeUtf8(std::string_view s, std::string* out) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  bool valid = true;
  size_t i = 0;
  while (i < n) {
    unsigned char b = p[i];
    if (b < 0x80) {
      size_t j = i + 1;
      while (j < n && p[j] < 0x80) ++j;  // ASCII run
      if (out) out->append(s.data() + i, j - i);
      i = j;
      continue;
    }
    size_t needed = 0;
    unsigned char lower = 0x80, upper = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
      needed = 1;
    } else if (b >= 0xE0 && b <= 0xEF) {
      needed = 2;
      if (b == 0xE0) lower = 0xA0;
      if (b == 0xED) upper = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
      needed = 3;
      if (b == 0xF0) lower = 0x90;
      if (b == 0xF4) upper = 0x8F;
    } else {
      valid = false;
      if (out) out->append("\xEF\xBF\xBD");
      ++i;
      continue;
    }
    size_t seen = 0;
    size_t j = i + 1;
    while (seen < needed && j < n && p[j] >= lower && p[j] <= upper) {
      lower = 0x80;
      upper = 0xBF;
      ++seen;
      ++j;
    }
    if (seen == needed) {
      if (out) out->append(s.data() + i, j - i);
    } else {
      // The lead byte and the continuation bytes seen so far are one error; the byte that broke
      // the sequence is decoded afresh.
      valid = false;
      if (out) out->append("\xEF\xBF\xBD");
    }
    i = j;
  }
  return valid;
}

}  // namespace

bool IsValidUtf8(std::string_view bytes) { return DecodeUtf8(bytes, nullptr); }

std::string RepairUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() + 8);
  DecodeUtf8(bytes, &out);
  return out;
}

namespace internal {

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsJsWhitespace(uint32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  switch (cp) {
    case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
    case 0xFEFF:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

bool IsNumeric(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

bool IsAlphanumeric(uint32_t cp) {
  if (cp < 0x80) return (cp >= '0' && cp <= '9') || ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z');
  auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  switch (c) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

bool IsNfcQuickCheckYes(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    if (static_cast<unsigned char>(s[pos]) < 0x80) {
      ++pos;
      continue;
    }
    uint32_t cp = NextCodePoint(s, &pos);
    if (cp < 0x300) continue;
    if (cp >= 0x1100 && cp <= 0x11FF) return false;  // jamo compose algorithmically
    const utf8proc_property_t* p = utf8proc_get_property(static_cast<utf8proc_int32_t>(cp));
    if (p->combining_class != 0 || p->decomp_seqindex != UINT16_MAX) return false;
    // utf8proc marks the second element of a composition pair with bit 15 of comb_index.
    if (p->comb_index != UINT16_MAX && (p->comb_index & 0x8000)) return false;
  }
  return true;
}

const ByteLevelMap& ByteLevel() {
  static const ByteLevelMap map = [] {
    ByteLevelMap m{};
    m.cp_to_byte.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      m.byte_to_cp[b] = cp;
      m.cp_to_byte[cp] = static_cast<int16_t>(b);
    }
    return m;
  }();
  return map;
}

bool ByteLevelToBytes(std::string_view s, std::string* out) {
  const ByteLevelMap& m = ByteLevel();
  out->clear();
  size_t pos = 0;
  while (pos < s.size()) {
    uint32_t cp = NextCodePoint(s, &pos);
    if (cp >= m.cp_to_byte.size() || m.cp_to_byte[cp] < 0) return false;
    out->push_back(static_cast<char>(m.cp_to_byte[cp]));
  }
  return true;
}

std::string BytesToByteLevel(std::string_view bytes) {
  const ByteLevelMap& m = ByteLevel();
  std::string out;
  for (unsigned char b : bytes) AppendUtf8(m.byte_to_cp[b], &out);
  return out;
}

}  // namespace internal
}  // namespace aha::tokenizer
