// UTF-8 and character-class helpers of the tokenizer (internal).
//
// Decoding follows the WHATWG UTF-8 decoder: a maximal invalid subsequence is one error, so
// RepairUtf8 gives the same text as JavaScript's TextDecoder and Rust's String::from_utf8_lossy.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace aha::tokenizer::internal {

// Reads one code point at `*pos` of valid UTF-8 and advances `*pos`.
inline uint32_t NextCodePoint(std::string_view s, size_t* pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + *pos;
  uint32_t c = p[0];
  if (c < 0x80) {
    *pos += 1;
    return c;
  }
  if (c < 0xE0) {
    *pos += 2;
    return ((c & 0x1F) << 6) | (p[1] & 0x3F);
  }
  if (c < 0xF0) {
    *pos += 3;
    return ((c & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  }
  *pos += 4;
  return ((c & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F);
}

// Length of the UTF-8 sequence that starts with lead byte `b` (1 for a stray byte).
inline size_t Utf8Length(unsigned char b) {
  if (b < 0xC0) return 1;
  if (b < 0xE0) return 2;
  if (b < 0xF0) return 3;
  return 4;
}

// The code point before `end` in valid UTF-8 (end > 0).
inline uint32_t PrevCodePoint(std::string_view s, size_t end, size_t* start) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  *start = i;
  size_t p = i;
  return NextCodePoint(s, &p);
}

void AppendUtf8(uint32_t cp, std::string* out);

// JavaScript's white space (String.prototype.trim, regex \s): WhiteSpace + LineTerminator.
bool IsJsWhitespace(uint32_t cp);
// Rust char::is_numeric: general categories Nd, Nl, No.
bool IsNumeric(uint32_t cp);
// Rust char::is_alphanumeric: Alphabetic or Numeric (used for added tokens' single_word).
bool IsAlphanumeric(uint32_t cp);

// True when NFC leaves `s` (valid UTF-8) unchanged, decided per code point from utf8proc's own
// tables: every code point is below U+0300, or a starter with no decomposition that is not the
// second half of a composition (nor a conjoining jamo). False means "maybe": run utf8proc.
bool IsNfcQuickCheckYes(std::string_view s);

// GPT-2's byte <-> printable-character bijection used by ByteLevel pre-tokenizer and decoder.
struct ByteLevelMap {
  std::array<uint32_t, 256> byte_to_cp;
  // cp_to_byte[cp] for cp < 324; -1 when cp is not an image of a byte.
  std::array<int16_t, 324> cp_to_byte;
};
const ByteLevelMap& ByteLevel();

// Maps a byte-level string ("Ġthe") back to raw bytes (" the"); false if a character is not an
// image of a byte.
bool ByteLevelToBytes(std::string_view s, std::string* out);
std::string BytesToByteLevel(std::string_view bytes);

}  // namespace aha::tokenizer::internal
