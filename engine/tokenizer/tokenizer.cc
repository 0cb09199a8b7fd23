// Tokenizer: loading tokenizer.json / tokenizer_config.json, the encode and decode pipelines, and
// the byte tokenizer.
#include "engine/tokenizer/tokenizer.h"

#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/tokenizer/bpe.h"
#include "engine/tokenizer/pretokenize.h"
#include "engine/tokenizer/unicode.h"

namespace aha::tokenizer {

using json = nlohmann::json;
using internal::BpeModel;
using internal::PreTokenizer;
using internal::StringIdMap;

namespace {

constexpr uint8_t kExists = 1, kSpecial = 2, kAdded = 4;
constexpr int kNfcOptions = UTF8PROC_STABLE | UTF8PROC_COMPOSE;

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false;
};

Status Bad(const std::string& path, const std::string& what) {
  return InvalidArgument(path + ": " + what);
}

std::string Quote(std::string_view s) {
  std::string q = json(std::string(s)).dump(-1, ' ', false, json::error_handler_t::replace);
  if (q.size() > 80) q = q.substr(0, 77) + "...";
  return q;
}

// Rejects nesting deeper than kMaxJsonDepth before the (recursive) JSON parser sees the text.
Status CheckJsonDepth(std::string_view text, const std::string& file) {
  int depth = 0;
  bool in_string = false, escape = false;
  for (char c : text) {
    if (in_string) {
      if (escape) escape = false;
      else if (c == '\\') escape = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth)
        return Bad(file, "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return OkStatus();
}

Result<json> ParseJson(std::string_view text, const std::string& file) {
  RETURN_IF_ERROR(CheckJsonDepth(text, file));
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Parse again with exceptions only to report where the text stops being JSON.
    try {
      json again = json::parse(text.begin(), text.end());
      (void)again;
    } catch (const json::parse_error& e) {
      return Bad(file, "not valid JSON (byte " + std::to_string(e.byte) + ")");
    } catch (const json::exception& e) {  // e.g. out_of_range: a number too large for a double
      return Bad(file, std::string("not valid JSON: ") + e.what());
    }
    return Bad(file, "not valid JSON");
  }
  return j;
}

// Optional member of an object; null counts as absent.
const json* Member(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

Result<bool> BoolMember(const json& obj, const char* key, const std::string& path, bool dflt) {
  const json* v = Member(obj, key);
  if (!v) return dflt;
  if (!v->is_boolean()) return Bad(path + "." + key, "expected true or false");
  return v->get<bool>();
}

Result<std::string> StringMember(const json& obj, const char* key, const std::string& path) {
  const json* v = Member(obj, key);
  if (!v) return Bad(path + "." + key, "missing");
  if (!v->is_string()) return Bad(path + "." + key, "expected a string");
  return v->get<std::string>();
}

Result<std::string> TypeOf(const json& obj, const std::string& path) {
  if (!obj.is_object()) return Bad(path, "expected an object");
  return StringMember(obj, "type", path);
}

// utf8proc option sets for the supported normalizers.
Result<std::vector<int>> ParseNormalizer(const json& n, const std::string& path) {
  ASSIGN_OR_RETURN(std::string type, TypeOf(n, path));
  const int stable = UTF8PROC_STABLE;
  if (type == "NFC") return std::vector<int>{kNfcOptions};
  if (type == "NFD") return std::vector<int>{stable | UTF8PROC_DECOMPOSE};
  if (type == "NFKC") return std::vector<int>{stable | UTF8PROC_COMPOSE | UTF8PROC_COMPAT};
  if (type == "NFKD") return std::vector<int>{stable | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT};
  if (type == "Sequence") {
    const json* members = Member(n, "normalizers");
    if (!members || !members->is_array()) return Bad(path + ".normalizers", "expected an array");
    std::vector<int> all;
    for (size_t i = 0; i < members->size(); ++i) {
      ASSIGN_OR_RETURN(auto some, ParseNormalizer((*members)[i], path + ".normalizers[" + std::to_string(i) + "]"));
      all.insert(all.end(), some.begin(), some.end());
    }
    return all;
  }
  return Unimplemented(path + ".type: normalizer " + Quote(type) +
                       " is not supported (supported: NFC, NFD, NFKC, NFKD, Sequence)");
}

Result<internal::SplitBehavior> ParseBehavior(const json& p, const std::string& path) {
  ASSIGN_OR_RETURN(std::string b, StringMember(p, "behavior", path));
  using B = internal::SplitBehavior;
  if (b == "Isolated") return B::kIsolated;
  if (b == "Removed") return B::kRemoved;
  if (b == "MergedWithPrevious") return B::kMergedWithPrevious;
  if (b == "MergedWithNext") return B::kMergedWithNext;
  if (b == "Contiguous") return B::kContiguous;
  return Bad(path + ".behavior", Quote(b) + " is not one of Isolated, Removed, MergedWithPrevious, "
                                 "MergedWithNext, Contiguous");
}

struct PreTokenizerSpec {
  std::unique_ptr<PreTokenizer> pre;
  bool byte_level = false;
};

// `last` is whether this pre-tokenizer runs last (ByteLevel must: its byte mapping feeds BPE).
Result<PreTokenizerSpec> ParsePreTokenizer(const json& p, const std::string& path, bool last) {
  ASSIGN_OR_RETURN(std::string type, TypeOf(p, path));
  PreTokenizerSpec spec;
  if (type == "Split") {
    const json* pattern = Member(p, "pattern");
    if (!pattern || !pattern->is_object()) return Bad(path + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    ASSIGN_OR_RETURN(auto behavior, ParseBehavior(p, path));
    ASSIGN_OR_RETURN(bool invert, BoolMember(p, "invert", path, false));
    if (const json* r = Member(*pattern, "Regex")) {
      if (!r->is_string()) return Bad(path + ".pattern.Regex", "expected a string");
      std::string re = r->get<std::string>();
      if (re.size() > kMaxPatternBytes) return Bad(path + ".pattern.Regex", "longer than " + std::to_string(kMaxPatternBytes) + " bytes");
      auto split = internal::MakeRegexSplit(re, behavior, invert);
      if (!split.ok()) return Bad(path + ".pattern.Regex", split.status().message());
      spec.pre = std::move(split).value();
    } else if (const json* s = Member(*pattern, "String")) {
      if (!s->is_string()) return Bad(path + ".pattern.String", "expected a string");
      spec.pre = internal::MakeStringSplit(s->get<std::string>(), behavior, invert);
    } else {
      return Bad(path + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    return spec;
  }
  if (type == "Digits") {
    ASSIGN_OR_RETURN(bool individual, BoolMember(p, "individual_digits", path, false));
    spec.pre = internal::MakeDigits(individual);
    return spec;
  }
  if (type == "ByteLevel") {
    if (!last) return Unimplemented(path + ": ByteLevel is supported only as the last pre-tokenizer");
    ASSIGN_OR_RETURN(bool prefix, BoolMember(p, "add_prefix_space", path, true));
    ASSIGN_OR_RETURN(bool use_regex, BoolMember(p, "use_regex", path, true));
    spec.pre = internal::MakeByteLevelSplit(prefix, use_regex);
    spec.byte_level = true;
    return spec;
  }
  if (type == "Sequence") {
    const json* members = Member(p, "pretokenizers");
    if (!members || !members->is_array()) return Bad(path + ".pretokenizers", "expected an array");
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (size_t i = 0; i < members->size(); ++i) {
      ASSIGN_OR_RETURN(auto member, ParsePreTokenizer((*members)[i], path + ".pretokenizers[" + std::to_string(i) + "]",
                                                      last && i + 1 == members->size()));
      steps.push_back(std::move(member.pre));
      spec.byte_level = spec.byte_level || member.byte_level;
    }
    spec.pre = internal::MakeSequence(std::move(steps));
    return spec;
  }
  return Unimplemented(path + ".type: pre-tokenizer " + Quote(type) +
                       " is not supported (supported: Split, Digits, ByteLevel, Sequence)");
}

// The token a tokenizer_config.json entry names: a string, or an AddedToken object.
Result<std::string> ConfigToken(const json& v, const std::string& path) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object()) return StringMember(v, "content", path);
  return Bad(path, "expected a string or an object with \"content\"");
}

Result<std::string> ReadFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return NotFound(path + ": no such file");
  auto size = std::filesystem::file_size(path, ec);
  if (ec) return IoError(path + ": " + ec.message());
  if (size > kMaxTokenizerFileBytes)
    return InvalidArgument(path + ": larger than " + std::to_string(kMaxTokenizerFileBytes) + " bytes");
  std::ifstream in(path, std::ios::binary);
  if (!in) return IoError(path + ": cannot open");
  std::string text(size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (!in) return IoError(path + ": read failed");
  return text;
}

bool IsAscii(std::string_view s) {
  for (unsigned char c : s)
    if (c >= 0x80) return false;
  return true;
}

// Appends utf8proc's normal form of `text` (valid UTF-8) to `out`.
void AppendNormalized(std::string_view text, int options, std::string* out) {
  utf8proc_uint8_t* result = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                    static_cast<utf8proc_ssize_t>(text.size()), &result,
                                    static_cast<utf8proc_option_t>(options));
  if (n >= 0) {
    out->append(reinterpret_cast<const char*>(result), static_cast<size_t>(n));
  } else {
    out->append(text);  // unreachable for valid UTF-8; keep the text as it is
  }
  std::free(result);
}

// Writes the normal form of `text` to `out`. For NFC only the spans that may change go through
// utf8proc: an ASCII character never composes with what precedes it and is never reordered, so
// NFC(a + b) = NFC(a) + NFC(b) whenever b starts with ASCII. Each non-ASCII run is normalized
// together with the ASCII character before it (a possible composition base), or copied when the
// quick check says NFC leaves it alone.
void Normalize(std::string_view text, int options, std::string* out) {
  out->clear();
  if (options != kNfcOptions) {
    AppendNormalized(text, options, out);
    return;
  }
  out->reserve(text.size() + 16);
  size_t i = 0;
  while (i < text.size()) {
    size_t run = i;
    while (run < text.size() && static_cast<unsigned char>(text[run]) < 0x80) ++run;
    size_t end = run;
    while (end < text.size() && static_cast<unsigned char>(text[end]) >= 0x80) ++end;
    if (run == end) {
      out->append(text.substr(i));
      break;
    }
    size_t unit = run > i ? run - 1 : run;  // the ASCII character before the run joins it
    out->append(text.substr(i, unit - i));
    std::string_view span = text.substr(unit, end - unit);
    if (internal::IsNfcQuickCheckYes(span)) {
      out->append(span);
    } else {
      AppendNormalized(span, options, out);
    }
    i = end;
  }
}

}  // namespace

class TokenizerImpl {
 public:
  Status Build(const json& root, const json* config);
  void EncodeAppend(std::string_view text, bool add_special, std::vector<int32_t>* out) const;
  std::string Decode(std::span<const int32_t> ids, bool skip_special) const;

  std::unique_ptr<BpeModel> bpe;
  bool byte_level = false;
  std::vector<int> normalizers;  // utf8proc options, applied in order
  std::unique_ptr<PreTokenizer> pre;
  std::vector<AddedToken> added;
  std::array<std::vector<int32_t>, 256> added_by_first_byte;  // indices into added, longest first
  std::vector<int32_t> prefix_ids, suffix_ids;                 // post-processor
  std::vector<std::string> id_text;                            // bytes each id decodes to
  std::vector<uint8_t> id_flags;
  bool decode_joins_with_space = false;  // no decoder on a non-byte-level model
  StringIdMap token_ids;                 // vocab strings and added-token contents
  int32_t bos = -1, eos = -1, pad = -1;

 private:
  // Ids must be dense: the largest allowed is the number of entries plus slack, so a small file
  // cannot make the id tables huge.
  int64_t max_id = 0;
  size_t added_count = 0;
  Status BuildModel(const json& model);
  Status BuildAddedTokens(const json& root);
  Status BuildPostProcessor(const json& p, const std::string& path);
  Status BuildConfig(const json& config);
  void EncodeSection(std::string_view section, std::vector<int32_t>* out) const;
  int32_t FindId(std::string_view token) const {
    auto it = token_ids.find(token);
    return it == token_ids.end() ? -1 : it->second;
  }
  void SetText(int32_t id, std::string text, uint8_t flags) {
    if (static_cast<size_t>(id) >= id_text.size()) {
      id_text.resize(id + 1);
      id_flags.resize(id + 1, 0);
    }
    id_text[id] = std::move(text);
    id_flags[id] = static_cast<uint8_t>(kExists | flags);
  }
};

Status TokenizerImpl::Build(const json& root, const json* config) {
  if (!root.is_object()) return Bad("tokenizer.json", "expected a JSON object");
  // The pre-tokenizer decides whether the model works on bytes, so it is read first.
  if (const json* p = Member(root, "pre_tokenizer")) {
    ASSIGN_OR_RETURN(auto spec, ParsePreTokenizer(*p, "pre_tokenizer", true));
    pre = std::move(spec.pre);
    byte_level = spec.byte_level;
  }
  if (const json* n = Member(root, "normalizer")) {
    ASSIGN_OR_RETURN(normalizers, ParseNormalizer(*n, "normalizer"));
  }
  const json* model = Member(root, "model");
  if (!model) return Bad("model", "missing");
  if (const json* list = Member(root, "added_tokens"); list && list->is_array()) added_count = list->size();
  RETURN_IF_ERROR(BuildModel(*model));
  RETURN_IF_ERROR(BuildAddedTokens(root));
  if (const json* d = Member(root, "decoder")) {
    ASSIGN_OR_RETURN(std::string type, TypeOf(*d, "decoder"));
    if (type != "ByteLevel")
      return Unimplemented("decoder.type: decoder " + Quote(type) + " is not supported (supported: ByteLevel)");
  } else if (!byte_level) {
    decode_joins_with_space = true;
  }
  if (const json* p = Member(root, "post_processor")) RETURN_IF_ERROR(BuildPostProcessor(*p, "post_processor"));
  if (config) RETURN_IF_ERROR(BuildConfig(*config));
  if (pad < 0) pad = eos;
  return OkStatus();
}

Status TokenizerImpl::BuildModel(const json& model) {
  if (!model.is_object()) return Bad("model", "expected an object");
  if (const json* t = Member(model, "type")) {
    if (!t->is_string()) return Bad("model.type", "expected a string");
    if (t->get<std::string>() != "BPE")
      return Unimplemented("model.type: model " + Quote(t->get<std::string>()) + " is not supported (supported: BPE)");
  }
  if (const json* d = Member(model, "dropout")) {
    if (!d->is_number()) return Bad("model.dropout", "expected a number or null");
    if (d->get<double>() != 0.0) return Unimplemented("model.dropout: BPE dropout is not supported (supported: null)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (const json* v = Member(model, key)) {
      if (!v->is_string()) return Bad(std::string("model.") + key, "expected a string or null");
      if (!v->get<std::string>().empty())
        return Unimplemented(std::string("model.") + key + " is not supported (supported: null or \"\")");
    }
  }
  internal::BpeOptions options;
  options.byte_level = byte_level;
  ASSIGN_OR_RETURN(options.ignore_merges, BoolMember(model, "ignore_merges", "model", false));
  ASSIGN_OR_RETURN(options.fuse_unk, BoolMember(model, "fuse_unk", "model", false));
  ASSIGN_OR_RETURN(options.byte_fallback, BoolMember(model, "byte_fallback", "model", false));

  const json* vocab = Member(model, "vocab");
  if (!vocab) return Bad("model.vocab", "missing");
  if (!vocab->is_object()) return Bad("model.vocab", "expected an object of token: id");
  StringIdMap model_vocab;  // symbol (bytes when byte-level) -> id
  max_id = std::min<int64_t>(kMaxTokenId, static_cast<int64_t>(vocab->size() + added_count) + (1 << 16));
  token_ids.reserve(vocab->size());
  model_vocab.reserve(vocab->size());
  std::string bytes;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    const std::string& token = it.key();
    const std::string path = "model.vocab[" + Quote(token) + "]";
    if (!it.value().is_number_integer()) return Bad(path, "expected an integer id");
    int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > max_id) return Bad(path, "id " + std::to_string(id) + " out of range [0, " + std::to_string(max_id) + "]");
    if (token.empty() || token.size() > kMaxTokenBytes) return Bad(path, "token is empty or longer than " + std::to_string(kMaxTokenBytes) + " bytes");
    if (!IsValidUtf8(token)) return Bad(path, "token is not valid UTF-8");
    token_ids.emplace(token, static_cast<int32_t>(id));
    std::string text = token;
    bool reachable = true;  // a byte-level token that is no byte string's image never comes out of BPE
    if (byte_level) {
      reachable = internal::ByteLevelToBytes(token, &bytes);
      if (reachable) text = bytes;
    }
    if (reachable) model_vocab.emplace(text, static_cast<int32_t>(id));
    SetText(static_cast<int32_t>(id), std::move(text), 0);
  }

  if (const json* unk = Member(model, "unk_token")) {
    if (!unk->is_string()) return Bad("model.unk_token", "expected a string or null");
    options.unk_id = FindId(unk->get<std::string>());
    if (options.unk_id < 0) return Bad("model.unk_token", Quote(unk->get<std::string>()) + " is not in model.vocab");
  }

  const json* merges = Member(model, "merges");
  internal::MergeTable table;
  if (merges) {
    if (!merges->is_array()) return Bad("model.merges", "expected an array");
    table.Reserve(merges->size());
    std::string left, right;
    for (size_t i = 0; i < merges->size(); ++i) {
      const json& m = (*merges)[i];
      const std::string path = "model.merges[" + std::to_string(i) + "]";
      if (m.is_string()) {
        const std::string& s = m.get_ref<const std::string&>();
        size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
          return Bad(path, Quote(s) + " is not two tokens separated by one space");
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0].get<std::string>();
        right = m[1].get<std::string>();
      } else {
        return Bad(path, "expected \"a b\" or [\"a\", \"b\"]");
      }
      int32_t a = FindId(left), b = FindId(right), ab = FindId(left + right);
      if (a < 0) return Bad(path, Quote(left) + " is not in model.vocab");
      if (b < 0) return Bad(path, Quote(right) + " is not in model.vocab");
      if (ab < 0) return Bad(path, "the merged token " + Quote(left + right) + " is not in model.vocab");
      table.Insert(a, b, static_cast<int32_t>(i), ab);
    }
  }
  bpe = std::make_unique<BpeModel>(std::move(model_vocab), std::move(table), options);
  return OkStatus();
}

Status TokenizerImpl::BuildAddedTokens(const json& root) {
  const json* list = Member(root, "added_tokens");
  if (!list) return OkStatus();
  if (!list->is_array()) return Bad("added_tokens", "expected an array");
  for (size_t i = 0; i < list->size(); ++i) {
    const json& t = (*list)[i];
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    if (!t.is_object()) return Bad(path, "expected an object");
    AddedToken a;
    const json* id = Member(t, "id");
    if (!id || !id->is_number_integer()) return Bad(path + ".id", "expected an integer");
    int64_t id64 = id->get<int64_t>();
    if (id64 < 0 || id64 > max_id) return Bad(path + ".id", "out of range [0, " + std::to_string(max_id) + "]");
    a.id = static_cast<int32_t>(id64);
    ASSIGN_OR_RETURN(a.content, StringMember(t, "content", path));
    if (a.content.empty() || a.content.size() > kMaxTokenBytes) return Bad(path + ".content", "empty or too long");
    if (!IsValidUtf8(a.content)) return Bad(path + ".content", "not valid UTF-8");
    ASSIGN_OR_RETURN(a.special, BoolMember(t, "special", path, false));
    ASSIGN_OR_RETURN(a.lstrip, BoolMember(t, "lstrip", path, false));
    ASSIGN_OR_RETURN(a.rstrip, BoolMember(t, "rstrip", path, false));
    ASSIGN_OR_RETURN(a.single_word, BoolMember(t, "single_word", path, false));
    ASSIGN_OR_RETURN(bool normalized, BoolMember(t, "normalized", path, false));
    (void)normalized;  // added tokens are matched on the raw text, as the reference does
    SetText(a.id, a.content, static_cast<uint8_t>(kAdded | (a.special ? kSpecial : 0)));
    token_ids[a.content] = a.id;
    added.push_back(std::move(a));
  }
  for (size_t i = 0; i < added.size(); ++i)
    added_by_first_byte[static_cast<unsigned char>(added[i].content[0])].push_back(static_cast<int32_t>(i));
  for (auto& bucket : added_by_first_byte) {
    std::stable_sort(bucket.begin(), bucket.end(), [&](int32_t x, int32_t y) {
      return added[x].content.size() > added[y].content.size();
    });
  }
  return OkStatus();
}

Status TokenizerImpl::BuildPostProcessor(const json& p, const std::string& path) {
  ASSIGN_OR_RETURN(std::string type, TypeOf(p, path));
  if (type == "ByteLevel") return OkStatus();  // offsets only; ids unchanged
  if (type == "Sequence") {
    const json* list = Member(p, "processors");
    if (!list || !list->is_array()) return Bad(path + ".processors", "expected an array");
    for (size_t i = 0; i < list->size(); ++i)
      RETURN_IF_ERROR(BuildPostProcessor((*list)[i], path + ".processors[" + std::to_string(i) + "]"));
    return OkStatus();
  }
  if (type != "TemplateProcessing")
    return Unimplemented(path + ".type: post-processor " + Quote(type) +
                         " is not supported (supported: ByteLevel, TemplateProcessing, Sequence)");
  const json* single = Member(p, "single");
  if (!single || !single->is_array()) return Bad(path + ".single", "expected an array");
  const json* specials = Member(p, "special_tokens");
  std::vector<int32_t> before, after;
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const json& item = (*single)[i];
    const std::string ipath = path + ".single[" + std::to_string(i) + "]";
    if (!item.is_object()) return Bad(ipath, "expected an object");
    if (Member(item, "Sequence")) {
      seen_sequence = true;
      continue;
    }
    const json* st = Member(item, "SpecialToken");
    if (!st || !st->is_object()) return Bad(ipath, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
    ASSIGN_OR_RETURN(std::string name, StringMember(*st, "id", ipath + ".SpecialToken"));
    std::vector<int32_t> ids;
    const json* entry = specials && specials->is_object() ? Member(*specials, name.c_str()) : nullptr;
    if (entry) {
      const json* list = entry->is_object() ? Member(*entry, "ids") : nullptr;
      if (!list || !list->is_array()) return Bad(path + ".special_tokens[" + Quote(name) + "].ids", "expected an array");
      for (const json& v : *list) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > kMaxTokenId)
          return Bad(path + ".special_tokens[" + Quote(name) + "].ids", "expected token ids");
        int32_t id = static_cast<int32_t>(v.get<int64_t>());
        if (static_cast<size_t>(id) >= id_flags.size() || !(id_flags[id] & kExists))
          return Bad(path + ".special_tokens[" + Quote(name) + "].ids", std::to_string(id) + " is not a token");
        ids.push_back(id);
      }
    } else {
      int32_t id = FindId(name);
      if (id < 0) return Bad(ipath + ".SpecialToken.id", Quote(name) + " is not a token");
      ids.push_back(id);
    }
    auto& target = seen_sequence ? after : before;
    target.insert(target.end(), ids.begin(), ids.end());
  }
  // A later processor wraps the output of an earlier one.
  prefix_ids.insert(prefix_ids.begin(), before.begin(), before.end());
  suffix_ids.insert(suffix_ids.end(), after.begin(), after.end());
  return OkStatus();
}

Status TokenizerImpl::BuildConfig(const json& config) {
  if (!config.is_object()) return Bad("tokenizer_config.json", "expected a JSON object");
  struct Slot {
    const char* key;
    int32_t* id;
  };
  int32_t unk = -1;
  for (Slot s : {Slot{"bos_token", &bos}, Slot{"eos_token", &eos}, Slot{"pad_token", &pad}, Slot{"unk_token", &unk}}) {
    const json* v = Member(config, s.key);
    if (!v) continue;
    const std::string path = std::string("tokenizer_config.json: ") + s.key;
    ASSIGN_OR_RETURN(std::string token, ConfigToken(*v, path));
    int32_t id = FindId(token);
    if (id < 0) return Bad(path, Quote(token) + " is not a token of tokenizer.json");
    *s.id = id;
    id_flags[id] |= kSpecial;
  }
  if (const json* extra = Member(config, "additional_special_tokens")) {
    const std::string path = "tokenizer_config.json: additional_special_tokens";
    if (!extra->is_array()) return Bad(path, "expected an array");
    for (size_t i = 0; i < extra->size(); ++i) {
      ASSIGN_OR_RETURN(std::string token, ConfigToken((*extra)[i], path + "[" + std::to_string(i) + "]"));
      int32_t id = FindId(token);
      if (id < 0) return Bad(path + "[" + std::to_string(i) + "]", Quote(token) + " is not a token of tokenizer.json");
      id_flags[id] |= kSpecial;
    }
  }
  return OkStatus();
}

void TokenizerImpl::EncodeSection(std::string_view section, std::vector<int32_t>* out) const {
  if (section.empty()) return;
  std::string normalized, next;
  for (int options : normalizers) {
    if (IsAscii(section)) break;  // every normal form leaves ASCII unchanged
    if (options == kNfcOptions && internal::IsNfcQuickCheckYes(section)) continue;
    Normalize(section, options, &next);
    normalized.swap(next);
    section = normalized;
  }
  if (section.empty()) return;
  if (!pre) {
    bpe->Encode(section, out);
    return;
  }
  thread_local std::vector<std::string_view> pieces;
  thread_local std::deque<std::string> arena;
  pieces.clear();
  arena.clear();
  pre->Split(section, &pieces, &arena);
  for (std::string_view piece : pieces) bpe->Encode(piece, out);
}

void TokenizerImpl::EncodeAppend(std::string_view text, bool add_special, std::vector<int32_t>* out) const {
  std::string repaired;
  if (!IsValidUtf8(text)) {
    repaired = RepairUtf8(text);
    text = repaired;
  }
  if (add_special) out->insert(out->end(), prefix_ids.begin(), prefix_ids.end());
  const size_t n = text.size();
  size_t start = 0, i = 0;
  while (i < n) {
    const auto& bucket = added_by_first_byte[static_cast<unsigned char>(text[i])];
    if (bucket.empty()) {
      ++i;
      continue;
    }
    const AddedToken* match = nullptr;
    for (int32_t k : bucket) {
      const std::string& c = added[k].content;
      if (text.compare(i, c.size(), c) == 0) {
        match = &added[k];
        break;
      }
    }
    if (!match) {
      ++i;
      continue;
    }
    size_t begin = i, end = i + match->content.size();
    if (match->single_word) {
      size_t prev_start = 0, pos = end;
      bool word_before = begin > 0 && internal::IsAlphanumeric(internal::PrevCodePoint(text, begin, &prev_start));
      bool word_after = end < n && internal::IsAlphanumeric(internal::NextCodePoint(text, &pos));
      if (word_before || word_after) {
        i = end;  // as upstream, the discarded match is consumed
        continue;
      }
    }
    if (match->lstrip) {
      while (begin > start) {
        size_t prev_start = 0;
        if (!internal::IsJsWhitespace(internal::PrevCodePoint(text, begin, &prev_start))) break;
        begin = prev_start;
      }
    }
    if (match->rstrip) {
      while (end < n) {
        size_t pos = end;
        if (!internal::IsJsWhitespace(internal::NextCodePoint(text, &pos))) break;
        end = pos;
      }
    }
    EncodeSection(text.substr(start, begin - start), out);
    out->push_back(match->id);
    start = i = end;
  }
  EncodeSection(text.substr(start), out);
  if (add_special) out->insert(out->end(), suffix_ids.begin(), suffix_ids.end());
}

std::string TokenizerImpl::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= id_flags.size() || !(id_flags[id] & kExists)) continue;
    if (skip_special && (id_flags[id] & kSpecial)) continue;
    if (decode_joins_with_space && !first) bytes.push_back(' ');
    bytes += id_text[id];
    first = false;
  }
  if (IsValidUtf8(bytes)) return bytes;
  return RepairUtf8(bytes);
}

Tokenizer::Tokenizer(std::unique_ptr<TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view tokenizer_json,
                                                       std::string_view config_json) {
  ASSIGN_OR_RETURN(json root, ParseJson(tokenizer_json, "tokenizer.json"));
  json config;
  if (!config_json.empty()) {
    ASSIGN_OR_RETURN(config, ParseJson(config_json, "tokenizer_config.json"));
  }
  auto impl = std::make_unique<TokenizerImpl>();
  RETURN_IF_ERROR(impl->Build(root, config_json.empty() ? nullptr : &config));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path file = path;
  if (fs::is_directory(file, ec)) file /= "tokenizer.json";
  ASSIGN_OR_RETURN(std::string text, ReadFile(file.string()));
  std::string config;
  fs::path config_path = file.parent_path() / "tokenizer_config.json";
  if (fs::exists(config_path, ec)) {
    ASSIGN_OR_RETURN(config, ReadFile(config_path.string()));
  }
  auto tok = FromJson(text, config);
  if (!tok.ok()) return tok.status().WithContext(file.string());
  return tok;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  impl_->EncodeAppend(text, add_special, &out);
  return out;
}

void Tokenizer::EncodeAppend(std::string_view text, bool add_special, std::vector<int32_t>* out) const {
  impl_->EncodeAppend(text, add_special, out);
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  return impl_->Decode(ids, skip_special);
}

std::string_view Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_flags.size() || !(impl_->id_flags[id] & kExists)) return {};
  return impl_->id_text[id];
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_text.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::pad_id() const { return impl_->pad; }

std::optional<int32_t> Tokenizer::TokenId(std::string_view token) const {
  auto it = impl_->token_ids.find(token);
  if (it == impl_->token_ids.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_flags.size() && (impl_->id_flags[id] & kSpecial);
}

std::pair<uint64_t, uint64_t> Tokenizer::CacheStats() const {
  return {impl_->bpe->cache_hits(), impl_->bpe->cache_lookups()};
}

// ---- byte tokenizer ----

namespace {
constexpr const char* kByteSpecials[] = {"<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"};
}  // namespace

std::string ByteTokenizerJson() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[internal::BytesToByteLevel(std::string(1, static_cast<char>(b)))] = b;
  json added = json::array();
  for (int i = 0; i < 3; ++i) {
    added.push_back({{"id", 256 + i}, {"content", kByteSpecials[i]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  const std::string bos = kByteSpecials[0];
  json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}};
  json root = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair",
         {{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
        {"special_tokens", {{bos, {{"id", bos}, {"ids", {kByteBos}}, {"tokens", {bos}}}}}}}},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", json::array()}}},
  };
  return root.dump(2);
}

std::string ByteTokenizerConfigJson() {
  json config = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                 {"bos_token", kByteSpecials[0]},
                 {"eos_token", kByteSpecials[1]},
                 {"pad_token", kByteSpecials[2]},
                 {"add_bos_token", false},
                 {"clean_up_tokenization_spaces", false},
                 {"model_max_length", 1 << 20}};
  return config.dump(2);
}

std::unique_ptr<Tokenizer> Tokenizer::Bytes() {
  auto tok = FromJson(ByteTokenizerJson(), ByteTokenizerConfigJson());
  AHA_CHECK(tok.ok()) << tok.status().ToString();
  return std::move(tok).value();
}

Status WriteByteTokenizerFiles(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return NotFound(dir + ": not a directory");
  for (auto [name, text] : {std::pair<const char*, std::string>{"tokenizer.json", ByteTokenizerJson()},
                            std::pair<const char*, std::string>{"tokenizer_config.json", ByteTokenizerConfigJson()}}) {
    std::string path = (std::filesystem::path(dir) / name).string();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text << "\n";
    out.close();
    if (!out) return IoError(path + ": write failed");
  }
  return OkStatus();
}

}  // namespace aha::tokenizer
