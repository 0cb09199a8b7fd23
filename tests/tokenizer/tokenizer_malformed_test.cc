// Untrusted tokenizer files: every corrupt, missing or unsupported field is a status that names
// the field, never a crash; plus a fuzz-style run of random mutations through the parser.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/tokenizer/tokenizer.h"
#include "tests/tokenizer/synthetic.h"

namespace aha::tokenizer {
namespace {

using json = nlohmann::json;

json Valid() {
  testing::SyntheticSpec spec;
  spec.num_merges = 40;
  spec.normalizer = {{"type", "NFC"}};
  spec.pre_tokenizer = {{"type", "Sequence"},
                        {"pretokenizers", {testing::SplitRegex(testing::kQwen2Regex), testing::ByteLevelPre()}}};
  spec.added_tokens = {testing::AddedToken(400, "<|im_end|>")};
  return testing::SyntheticTokenizer(spec);
}

// The load error for `j` (an empty string when it loads).
std::string Error(const json& j, const json& config = nullptr) {
  auto tok = Tokenizer::FromJson(j.dump(), config.is_null() ? "" : config.dump());
  return tok.ok() ? "" : tok.status().ToString();
}

#define EXPECT_ERROR(j, substring)                                                   \
  do {                                                                               \
    std::string e = Error(j);                                                        \
    EXPECT_NE(e.find(substring), std::string::npos) << "error was: '" << e << "'"; \
  } while (0)

TEST(MalformedTokenizer, ValidBaselineLoads) { EXPECT_EQ(Error(Valid()), ""); }

TEST(MalformedTokenizer, FuzzSeedLoadsAndUsesEveryComponent) {
  auto tok = Tokenizer::Load(std::string(AHA_TOKENIZER_TEST_DIR) + "/seeds/tiny_tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  auto ids = (*tok)->Encode("the world 12345 <think> x", true);
  EXPECT_EQ(ids.front(), 300);  // the template's leading special token
  EXPECT_NE(std::find(ids.begin(), ids.end(), 301), ids.end());
  EXPECT_EQ((*tok)->Decode(ids, true), "the world 12345<think>x");  // <think> strips around it
}

TEST(MalformedTokenizer, MissingFileIsNotFound) {
  auto tok = Tokenizer::Load("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(tok.ok());
  EXPECT_TRUE(IsNotFound(tok.status())) << tok.status().ToString();
  auto dir = Tokenizer::Load(std::filesystem::temp_directory_path().string());  // a dir without one
  EXPECT_FALSE(dir.ok());
}

TEST(MalformedTokenizer, NotJsonOrNotAnObject) {
  auto bad = Tokenizer::FromJson("{\"model\": ");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("not valid JSON"), std::string::npos) << bad.status().ToString();
  EXPECT_ERROR(json::array(), "expected a JSON object");
  EXPECT_FALSE(Tokenizer::FromJson("").ok());
}

// A number beyond a double's range is an error of the parser's own kind (out_of_range, not
// parse_error): found by scripts/fuzz.sh, it escaped the catch and aborted the process.
TEST(MalformedTokenizer, NumberOutOfRangeIsAnError) {
  for (const char* text : {"\n9E99999", "{\"model\": {\"dropout\": 1e400}}"}) {
    auto tok = Tokenizer::FromJson(text);
    ASSERT_FALSE(tok.ok()) << text;
    EXPECT_NE(tok.status().message().find("not valid JSON"), std::string::npos) << tok.status().ToString();
  }
}

TEST(MalformedTokenizer, DeepNestingIsRejectedBeforeParsing) {
  std::string bomb = std::string(100000, '[') + std::string(100000, ']');
  auto tok = Tokenizer::FromJson(bomb);
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("nested deeper"), std::string::npos);
}

TEST(MalformedTokenizer, ModelFields) {
  json j = Valid();
  j.erase("model");
  EXPECT_ERROR(j, "model: missing");
  j = Valid();
  j["model"]["type"] = "WordPiece";
  EXPECT_ERROR(j, "supported: BPE");
  j = Valid();
  j["model"].erase("vocab");
  EXPECT_ERROR(j, "model.vocab: missing");
  j = Valid();
  j["model"]["vocab"] = json::array();
  EXPECT_ERROR(j, "model.vocab: expected an object");
  j = Valid();
  j["model"]["vocab"]["zz"] = "seven";
  EXPECT_ERROR(j, "model.vocab[\"zz\"]: expected an integer id");
  j = Valid();
  j["model"]["vocab"]["zz"] = -3;
  EXPECT_ERROR(j, "model.vocab[\"zz\"]: id -3 out of range");
  j = Valid();
  j["model"]["vocab"]["zz"] = 2000000000;
  EXPECT_ERROR(j, "out of range");
  j = Valid();
  j["model"]["dropout"] = 0.1;
  EXPECT_ERROR(j, "dropout");
  j = Valid();
  j["model"]["continuing_subword_prefix"] = "##";
  EXPECT_ERROR(j, "continuing_subword_prefix");
  j = Valid();
  j["model"]["unk_token"] = "<nope>";
  EXPECT_ERROR(j, "model.unk_token");
  j = Valid();
  j["model"]["ignore_merges"] = "yes";
  EXPECT_ERROR(j, "model.ignore_merges: expected true or false");
}

TEST(MalformedTokenizer, Merges) {
  json j = Valid();
  j["model"]["merges"] = "a b";
  EXPECT_ERROR(j, "model.merges: expected an array");
  j = Valid();
  j["model"]["merges"][3] = 17;
  EXPECT_ERROR(j, "model.merges[3]: expected");
  j = Valid();
  j["model"]["merges"][2] = "abc";
  EXPECT_ERROR(j, "model.merges[2]: \"abc\" is not two tokens");
  j = Valid();
  j["model"]["merges"][1] = json::array({"q", "\u00e9\u00e9"});
  EXPECT_ERROR(j, "model.merges[1]: \"éé\" is not in model.vocab");
  j = Valid();
  j["model"]["merges"][0] = json::array({"x", "q"});
  EXPECT_ERROR(j, "model.merges[0]: the merged token \"xq\" is not in model.vocab");
}

TEST(MalformedTokenizer, UnsupportedComponentsListWhatIsSupported) {
  json j = Valid();
  j["normalizer"] = {{"type", "Lowercase"}};
  EXPECT_ERROR(j, "normalizer.type: normalizer \"Lowercase\" is not supported (supported: NFC, NFD, NFKC, NFKD, Sequence)");
  j = Valid();
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  EXPECT_ERROR(j, "(supported: Split, Digits, ByteLevel, Sequence)");
  j = Valid();
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  EXPECT_ERROR(j, "pre_tokenizer.pretokenizers[0].behavior");
  j = Valid();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}};
  EXPECT_ERROR(j, "pre_tokenizer.pretokenizers[0].pattern.Regex: regex does not compile");
  j = Valid();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = "\\s+";
  EXPECT_ERROR(j, "pre_tokenizer.pretokenizers[0].pattern");
  j = Valid();
  j["pre_tokenizer"]["pretokenizers"] = {testing::ByteLevelPre(), testing::SplitRegex("x")};
  EXPECT_ERROR(j, "ByteLevel is supported only as the last pre-tokenizer");
  j = Valid();
  j["decoder"] = {{"type", "WordPiece"}};
  EXPECT_ERROR(j, "(supported: ByteLevel)");
  j = Valid();
  j["post_processor"] = {{"type", "BertProcessing"}};
  EXPECT_ERROR(j, "(supported: ByteLevel, TemplateProcessing, Sequence)");
  j = Valid();
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}}},
                         {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {4000}}, {"tokens", {"<s>"}}}}}}};
  EXPECT_ERROR(j, "post_processor.special_tokens[\"<s>\"].ids: 4000 is not a token");
  j = Valid();
  j["pre_tokenizer"] = {{"kind", "Split"}};
  EXPECT_ERROR(j, "pre_tokenizer.type: missing");
}

TEST(MalformedTokenizer, AddedTokensAndConfig) {
  json j = Valid();
  j["added_tokens"][0].erase("content");
  EXPECT_ERROR(j, "added_tokens[0].content: missing");
  j = Valid();
  j["added_tokens"][0]["id"] = "400";
  EXPECT_ERROR(j, "added_tokens[0].id: expected an integer");
  j = Valid();
  j["added_tokens"][0]["content"] = "";
  EXPECT_ERROR(j, "added_tokens[0].content");
  j = Valid();
  j["added_tokens"] = {{"id", 1}};
  EXPECT_ERROR(j, "added_tokens: expected an array");

  EXPECT_NE(Error(Valid(), {{"eos_token", "<|nope|>"}}).find("tokenizer_config.json: eos_token: \"<|nope|>\" is not a token"),
            std::string::npos);
  EXPECT_NE(Error(Valid(), {{"bos_token", 5}}).find("bos_token"), std::string::npos);
  EXPECT_NE(Error(Valid(), json::array()).find("tokenizer_config.json: expected a JSON object"), std::string::npos);
  auto bad_config = Tokenizer::FromJson(Valid().dump(), "{oops");
  ASSERT_FALSE(bad_config.ok());
  EXPECT_NE(bad_config.status().message().find("tokenizer_config.json: not valid JSON"), std::string::npos);
}

TEST(MalformedTokenizer, LoadNamesTheFile) {
  auto dir = std::filesystem::temp_directory_path() / ("aha_bad_tok_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  json j = Valid();
  j["model"]["merges"][0] = 5;
  std::ofstream(dir / "tokenizer.json") << j.dump();
  auto tok = Tokenizer::Load(dir.string());
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("tokenizer.json: model.merges[0]"), std::string::npos) << tok.status().ToString();
  std::filesystem::remove_all(dir);
}

TEST(MalformedTokenizer, EveryTruncationFailsCleanly) {
  std::string text = Valid().dump();
  for (size_t n = 0; n < text.size(); n += std::max<size_t>(1, text.size() / 400)) {
    auto tok = Tokenizer::FromJson(std::string_view(text).substr(0, n));
    EXPECT_FALSE(tok.ok()) << "prefix of " << n << " bytes loaded";
  }
}

// Fuzz-style: random byte-level and structure-level mutations of a valid file. Each must load or
// fail with a status; a tokenizer that loads must encode and decode arbitrary text.
TEST(MalformedTokenizer, RandomMutationsNeverCrash) {
  const json valid = Valid();
  const std::string text = valid.dump();
  uint64_t state = 12345;
  auto next = [&] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const std::string probe = "Hello, wörld! 123 <|im_end|> \xff\xfe 日本語 \t\n  x";
  int loaded = 0;
  for (int iter = 0; iter < 1500; ++iter) {
    std::string mutated;
    if (iter % 2 == 0) {
      // Byte-level: flip, insert, delete or duplicate a few spans.
      mutated = text;
      int edits = 1 + static_cast<int>(next() % 4);
      for (int e = 0; e < edits && !mutated.empty(); ++e) {
        size_t at = next() % mutated.size();
        switch (next() % 4) {
          case 0: mutated[at] = static_cast<char>(next()); break;
          case 1: mutated.insert(at, 1, "{}[]\",:0-e\\"[next() % 11]); break;
          case 2: mutated.erase(at, 1 + next() % 16); break;
          default: mutated.insert(at, mutated.substr(at, next() % 32)); break;
        }
      }
    } else {
      // Structure-level: replace one field somewhere with a value of another type.
      json j = valid;
      const json replacements[] = {nullptr, 0, -1, 1e300, "x", "", json::array(), json::object(), true,
                                   json::array({"a", "b", "c"}), {{"type", "Sequence"}}, 2147483647};
      const char* fields[] = {"normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens", "model"};
      const char* model_fields[] = {"type", "vocab", "merges", "ignore_merges", "unk_token", "dropout", "byte_fallback"};
      json value = replacements[next() % std::size(replacements)];
      switch (next() % 4) {
        case 0: j[fields[next() % std::size(fields)]] = value; break;
        case 1: j["model"][model_fields[next() % std::size(model_fields)]] = value; break;
        case 2: j["model"]["merges"][next() % j["model"]["merges"].size()] = value; break;
        default: j["pre_tokenizer"]["pretokenizers"][next() % 2] = value; break;
      }
      mutated = j.dump();
    }
    auto tok = Tokenizer::FromJson(mutated);
    if (!tok.ok()) {
      EXPECT_FALSE(tok.status().message().empty());
      continue;
    }
    ++loaded;
    auto ids = (*tok)->Encode(probe, true);
    (void)(*tok)->Decode(ids);
    for (int32_t id : ids) EXPECT_FALSE((*tok)->TokenBytes(id).empty());
  }
  EXPECT_GT(loaded, 0);  // some mutations are harmless; they must still work
}

}  // namespace
}  // namespace aha::tokenizer
