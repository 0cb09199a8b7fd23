// Tokenizer behaviour on small, synthetic tokenizer.json files: BPE merge order, merges in both
// forms, ignore_merges, unknown handling, added tokens, normalizers, pre-tokenizers, the byte
// tokenizer and its files, UTF-8 repair, prompt templates and `aha tokenize`.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include <utf8proc.h>

#include "engine/tokenizer/pretokenize.h"
#include "engine/tokenizer/sample_corpus.h"
#include "engine/tokenizer/prompt_template.h"
#include "engine/tokenizer/tokenize_command.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "tests/tokenizer/synthetic.h"

namespace aha::tokenizer {
namespace {

using json = nlohmann::json;
namespace t = testing;

std::unique_ptr<Tokenizer> MustLoad(const json& j, const json& config = nullptr) {
  auto tok = Tokenizer::FromJson(j.dump(), config.is_null() ? "" : config.dump());
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

std::vector<std::string> Pieces(const internal::PreTokenizer& pre, std::string_view text) {
  std::vector<std::string_view> out;
  std::deque<std::string> arena;
  pre.Split(text, &out, &arena);
  return {out.begin(), out.end()};
}

// A character-level (not byte-level) BPE over the given vocab and merges.
json CharModel(json vocab, json merges, json extra = json::object()) {
  json model = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}};
  model.update(extra);
  return {{"model", model}, {"pre_tokenizer", nullptr}, {"decoder", nullptr}};
}

// ---- BPE ----

// Textbook BPE: repeatedly merge the adjacent pair with the lowest rank (leftmost on ties).
std::vector<std::string> NaiveBpe(std::vector<std::string> word, const std::map<std::pair<std::string, std::string>, int>& ranks) {
  while (true) {
    int best = -1;
    size_t at = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = ranks.find({word[i], word[i + 1]});
      if (it != ranks.end() && (best < 0 || it->second < best)) {
        best = it->second;
        at = i;
      }
    }
    if (best < 0) return word;
    word[at] += word[at + 1];
    word.erase(word.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
}

TEST(Bpe, MergePriorityEqualsTextbookBpeOnRandomWords) {
  t::SyntheticSpec spec;
  spec.pre_tokenizer = t::ByteLevelPre(false, false);  // the whole text is one piece
  spec.num_merges = 400;
  json j = t::SyntheticTokenizer(spec);
  auto tok = MustLoad(j);
  ASSERT_TRUE(tok);
  std::map<std::pair<std::string, std::string>, int> ranks;
  for (size_t i = 0; i < j["model"]["merges"].size(); ++i) {
    const json& m = j["model"]["merges"][i];
    ranks.emplace(std::make_pair(m[0].get<std::string>(), m[1].get<std::string>()), static_cast<int>(i));
  }
  const std::string alphabet = "the quick brown fox 1234 hello world'sldn";
  uint64_t state = 7;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string text;
    size_t len = 1 + (state = state * 6364136223846793005ULL + 1442695040888963407ULL) % 40;
    for (size_t i = 0; i < len; ++i) {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      text.push_back(alphabet[(state >> 33) % alphabet.size()]);
    }
    std::vector<std::string> symbols;
    for (char c : text) symbols.push_back(t::ByteLevelImage(std::string(1, c)));
    std::vector<int32_t> expected;
    for (const auto& s : NaiveBpe(symbols, ranks)) expected.push_back(*tok->TokenId(s));
    ASSERT_EQ(tok->Encode(text), expected) << text;
    ASSERT_EQ(tok->Encode(text), expected) << "cached result differs: " << text;
  }
  auto [hits, lookups] = tok->CacheStats();
  EXPECT_GT(hits, 0u);
  EXPECT_EQ(lookups, 6000u);
}

TEST(Bpe, MergesAsStringsAndAsPairsLoadTheSameModel) {
  t::SyntheticSpec a, b;
  b.merges_as_pairs = false;
  auto ta = MustLoad(t::SyntheticTokenizer(a));
  auto tb = MustLoad(t::SyntheticTokenizer(b));
  ASSERT_TRUE(ta && tb);
  for (std::string s : {"the theory of everything", "hello world 12345", "I'm there, aren't we?"}) {
    EXPECT_EQ(ta->Encode(s), tb->Encode(s)) << s;
    EXPECT_GT(s.size(), ta->Encode(s).size()) << "merges did not apply to " << s;
  }
}

TEST(Bpe, IgnoreMergesTakesWholeWordFromVocab) {
  json vocab = {{"a", 0}, {"b", 1}, {"c", 2}, {"bc", 3}, {"abc", 4}};
  json merges = json::array({"b c"});
  auto plain = MustLoad(CharModel(vocab, merges));
  auto ignore = MustLoad(CharModel(vocab, merges, {{"ignore_merges", true}}));
  EXPECT_EQ(plain->Encode("abc"), (std::vector<int32_t>{0, 3}));
  EXPECT_EQ(ignore->Encode("abc"), (std::vector<int32_t>{4}));
  EXPECT_EQ(ignore->Encode("cab"), (std::vector<int32_t>{2, 0, 1}));
}

TEST(Bpe, UnknownCharactersUseUnkFuseUnkOrByteFallback) {
  json vocab = {{"<unk>", 0}, {"a", 1}, {"b", 2}, {"<0x78>", 3}};
  auto unk = MustLoad(CharModel(vocab, json::array(), {{"unk_token", "<unk>"}}));
  auto fused = MustLoad(CharModel(vocab, json::array(), {{"unk_token", "<unk>"}, {"fuse_unk", true}}));
  auto dropped = MustLoad(CharModel(vocab, json::array()));
  auto fallback = MustLoad(CharModel(vocab, json::array(), {{"unk_token", "<unk>"}, {"byte_fallback", true}}));
  EXPECT_EQ(unk->Encode("ayyb"), (std::vector<int32_t>{1, 0, 0, 2}));
  EXPECT_EQ(fused->Encode("ayyb"), (std::vector<int32_t>{1, 0, 2}));
  EXPECT_EQ(dropped->Encode("ayyb"), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(fallback->Encode("axyb"), (std::vector<int32_t>{1, 3, 0, 2}));  // x has <0x78>, y has none
  EXPECT_EQ(unk->Decode(std::vector<int32_t>{1, 0, 2}), "a <unk> b");  // no decoder: tokens joined by spaces
}

// ---- added tokens ----

json WithAdded(json added) {
  t::SyntheticSpec spec;
  spec.pre_tokenizer = {{"type", "Sequence"}, {"pretokenizers", {t::SplitRegex(t::kQwen2Regex), t::ByteLevelPre()}}};
  spec.added_tokens = std::move(added);
  return t::SyntheticTokenizer(spec);
}

TEST(AddedTokens, SplitOutBeforeBpeLongestFirst) {
  auto tok = MustLoad(WithAdded({t::AddedToken(900, "<a>"), t::AddedToken(901, "<a>b", false)}));
  auto ids = tok->Encode("x<a>by<a>");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids[1], 901);
  EXPECT_EQ(ids.back(), 900);
  EXPECT_EQ(tok->Decode(ids), "x<a>by<a>");
  EXPECT_EQ(tok->Decode(ids, /*skip_special=*/true), "x<a>by");  // 901 is not special
}

TEST(AddedTokens, LstripAndRstripAbsorbWhitespace) {
  auto tok = MustLoad(WithAdded({t::AddedToken(900, "<m>", true, true, true)}));
  auto bare = MustLoad(WithAdded({t::AddedToken(900, "<m>")}));
  EXPECT_EQ(tok->Encode("a  <m>  b"), tok->Encode("a<m>b"));
  EXPECT_NE(bare->Encode("a  <m>  b"), bare->Encode("a<m>b"));
}

TEST(AddedTokens, SingleWordMatchesOnlyBetweenWordBoundaries) {
  auto tok = MustLoad(WithAdded({t::AddedToken(900, "cat", false, false, false, true)}));
  auto count = [&](std::string_view s) {
    auto ids = tok->Encode(s);
    return std::count(ids.begin(), ids.end(), 900);
  };
  EXPECT_EQ(count("cat"), 1);
  EXPECT_EQ(count("a cat sat"), 1);
  EXPECT_EQ(count("(cat)"), 1);
  EXPECT_EQ(count("concatenate"), 0);
  EXPECT_EQ(count("cats"), 0);
  EXPECT_EQ(count("tomcat"), 0);
}

TEST(AddedTokens, SpecialIdsFromConfigAcceptStringsAndObjects) {
  json j = WithAdded({t::AddedToken(900, "<s>"), t::AddedToken(901, "</s>"), t::AddedToken(902, "<pad>")});
  json config = {{"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}}}, {"eos_token", "</s>"}, {"pad_token", nullptr}};
  auto tok = MustLoad(j, config);
  EXPECT_EQ(tok->bos_id(), 900);
  EXPECT_EQ(tok->eos_id(), 901);
  EXPECT_EQ(tok->pad_id(), 901);  // falls back to eos
  auto none = MustLoad(j);
  EXPECT_EQ(none->bos_id(), -1);
  EXPECT_EQ(none->eos_id(), -1);
}

TEST(PostProcessor, TemplateAddsBosOnlyWithAddSpecial) {
  t::SyntheticSpec spec;
  spec.added_tokens = {t::AddedToken(900, "<s>"), t::AddedToken(901, "</s>")};
  spec.post_processor = {{"type", "TemplateProcessing"},
                         {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                     {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}}},
                         {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {900}}, {"tokens", {"<s>"}}}}}}};
  auto tok = MustLoad(t::SyntheticTokenizer(spec));
  auto plain = tok->Encode("hi");
  auto special = tok->Encode("hi", true);
  ASSERT_EQ(special.size(), plain.size() + 2);
  EXPECT_EQ(special.front(), 900);
  EXPECT_EQ(special.back(), 901);
}

// ---- normalizers and pre-tokenizers ----

TEST(Normalizer, NfcComposesBeforeBpe) {
  t::SyntheticSpec spec;
  spec.normalizer = {{"type", "NFC"}};
  auto tok = MustLoad(t::SyntheticTokenizer(spec));
  EXPECT_EQ(tok->Encode("caf\u0065\u0301"), tok->Encode("caf\u00e9"));
  EXPECT_EQ(tok->Decode(tok->Encode("caf\u0065\u0301")), "caf\u00e9");
  t::SyntheticSpec nfd;
  nfd.normalizer = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFD"}}}}};
  auto tok2 = MustLoad(t::SyntheticTokenizer(nfd));
  EXPECT_EQ(tok2->Decode(tok2->Encode("caf\u00e9")), "caf\u0065\u0301");
}

TEST(PreTokenizer, QwenRegexSplitsLikeTheReference) {
  auto split = internal::MakeRegexSplit(t::kQwen2Regex, internal::SplitBehavior::kIsolated, false);
  ASSERT_TRUE(split.ok()) << split.status().ToString();
  EXPECT_EQ(Pieces(**split, "I'm 123 HELLO'LL  x\n\n y"),
            (std::vector<std::string>{"I", "'m", " ", "1", "2", "3", " HELLO", "'LL", " ", " x", "\n\n", " y"}));
  auto llama = internal::MakeRegexSplit(t::kLlama3Regex, internal::SplitBehavior::kIsolated, false);
  ASSERT_TRUE(llama.ok());
  EXPECT_EQ(Pieces(**llama, "12345 ab"), (std::vector<std::string>{"123", "45", " ab"}));
  // U+FEFF is white space to the reference (JavaScript), U+0085 is not.
  EXPECT_EQ(Pieces(**split, "a\ufeff\ufeffb"), (std::vector<std::string>{"a", "\ufeff", "\ufeffb"}));
  EXPECT_EQ(Pieces(**split, "!\u0085\u0085"), (std::vector<std::string>{"!\u0085\u0085"}));
}

TEST(PreTokenizer, SplitBehaviorsAndInvert) {
  using B = internal::SplitBehavior;
  auto make = [](B b, bool invert = false) { return internal::MakeStringSplit("-", b, invert); };
  EXPECT_EQ(Pieces(*make(B::kIsolated), "a-b--c"), (std::vector<std::string>{"a", "-", "b", "-", "-", "c"}));
  EXPECT_EQ(Pieces(*make(B::kRemoved), "a-b--c"), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(Pieces(*make(B::kMergedWithPrevious), "a-b--c"), (std::vector<std::string>{"a-", "b-", "-", "c"}));
  EXPECT_EQ(Pieces(*make(B::kMergedWithNext), "a-b--c"), (std::vector<std::string>{"a", "-b", "-", "-c"}));
  EXPECT_EQ(Pieces(*make(B::kContiguous), "a-b--c"), (std::vector<std::string>{"a", "-", "b", "--", "c"}));
  EXPECT_EQ(Pieces(*make(B::kRemoved, true), "a-b--c"), (std::vector<std::string>{"-", "-", "-"}));
  auto words = internal::MakeRegexSplit("\\s+", B::kRemoved, false);
  ASSERT_TRUE(words.ok());
  EXPECT_EQ(Pieces(**words, " hello   world "), (std::vector<std::string>{"hello", "world"}));
}

TEST(PreTokenizer, DigitsIndividuallyOrInRuns) {
  EXPECT_EQ(Pieces(*internal::MakeDigits(true), "ab123c٣٤"),
            (std::vector<std::string>{"ab", "1", "2", "3", "c", "٣", "٤"}));
  EXPECT_EQ(Pieces(*internal::MakeDigits(false), "ab123c4"), (std::vector<std::string>{"ab", "123", "c", "4"}));
}

TEST(PreTokenizer, ByteLevelPrefixSpaceAndGpt2Regex) {
  auto pre = internal::MakeByteLevelSplit(true, true);
  EXPECT_EQ(Pieces(*pre, "Hello world's"), (std::vector<std::string>{" Hello", " world", "'s"}));
}

TEST(PreTokenizer, TranslatedPatternUsesJavaScriptWhiteSpace) {
  std::string p = internal::TranslatePattern("[^\\s\\p{L}]|\\s+(?!\\S)|\\\\s|[\\]\\s]");
  EXPECT_EQ(p.find("\\s"), p.find("\\\\s") + 1);  // only the escaped backslash form survives
  EXPECT_NE(p.find("\\x{FEFF}"), std::string::npos);
}

TEST(PreTokenizer, VeryLongRunsDoNotExhaustTheMatcher) {
  t::SyntheticSpec spec;
  spec.pre_tokenizer = {{"type", "Sequence"}, {"pretokenizers", {t::SplitRegex(t::kQwen2Regex), t::ByteLevelPre()}}};
  auto tok = MustLoad(t::SyntheticTokenizer(spec));
  for (std::string run : {std::string(300000, ' '), std::string(300000, 'a'), std::string(100000, '!') + "\n"}) {
    std::string text = "x" + run + "y";
    EXPECT_EQ(tok->Decode(tok->Encode(text)), text);
  }
}

TEST(Tokenizer, EncodeIsThreadSafe) {
  auto tok = MustLoad(WithAdded({t::AddedToken(900, "<a>")}));
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back("the word " + std::to_string(i * 7919) + " <a> hello " + std::string(i % 13, 'x'));
  std::vector<std::vector<int32_t>> expected;
  for (const auto& s : texts) expected.push_back(tok->Encode(s));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int th = 0; th < 4; ++th) {
    threads.emplace_back([&] {
      for (int round = 0; round < 20; ++round)
        for (size_t i = 0; i < texts.size(); ++i)
          if (tok->Encode(texts[i]) != expected[i]) ++mismatches;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// ---- UTF-8 ----

TEST(Utf8, RepairReplacesEachMaximalInvalidSubsequence) {
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(RepairUtf8("ok"), "ok");
  EXPECT_EQ(RepairUtf8("\xF0\x9F\x98"), r);              // truncated 4-byte sequence: one
  EXPECT_EQ(RepairUtf8("\xC0\xAF"), r + r);              // overlong: two
  EXPECT_EQ(RepairUtf8("\xED\xA0\x80"), r + r + r);      // surrogate: three
  EXPECT_EQ(RepairUtf8("a\xE2\x82" "b"), "a" + r + "b");  // the breaking byte is kept
  EXPECT_EQ(RepairUtf8("\xF4\x90\x80\x80"), r + r + r + r);
  EXPECT_TRUE(IsValidUtf8("h\xC3\xA9llo \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xFF"));
}

std::string Nfc(const std::string& s) {
  utf8proc_uint8_t* out = utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()));
  std::string r(reinterpret_cast<const char*>(out));
  std::free(out);
  return r;
}

// The NFC fast path skips utf8proc only when NFC provably changes nothing: checked for every code
// point alone and after starters that begin compositions.
TEST(Utf8, NfcQuickCheckNeverSkipsAStringThatNfcChanges) {
  const uint32_t firsts[] = {'a', 'e', 'A', 0x435, 0x627, 0x30AB, 0x0B47, 0x1100, 0xAC00, 0x915, 0x3B1, 0x0DD9};
  size_t yes = 0;
  for (uint32_t cp = 0x80; cp <= 0x10FFFF; ++cp) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    std::string one;
    internal::AppendUtf8(cp, &one);
    if (!internal::IsNfcQuickCheckYes(one)) continue;
    ++yes;
    ASSERT_EQ(Nfc(one), one) << std::hex << cp;
    for (uint32_t f : firsts) {
      std::string two;
      internal::AppendUtf8(f, &two);
      two += one;
      ASSERT_EQ(Nfc(two), two) << std::hex << f << " + " << cp;
    }
  }
  EXPECT_GT(yes, 100000u);  // CJK and most scripts take the fast path
  EXPECT_FALSE(internal::IsNfcQuickCheckYes("e\u0301"));
  EXPECT_TRUE(internal::IsNfcQuickCheckYes("caf\u00e9 \u65e5\u672c"));
}

// The NFC normalizer works span by span (utf8proc only where the quick check fails); the result
// must equal utf8proc's NFC of the whole text.
TEST(Normalizer, SpanwiseNfcEqualsWholeTextNfc) {
  t::SyntheticSpec spec;
  spec.normalizer = {{"type", "NFC"}};
  spec.pre_tokenizer = t::ByteLevelPre(false, false);
  auto tok = MustLoad(t::SyntheticTokenizer(spec));
  size_t changed = 0;
  for (const std::string& s : ParityCorpus(99, 4000, /*with_invalid_utf8=*/false)) {
    std::string nfc = Nfc(s);
    changed += nfc != s;
    ASSERT_EQ(tok->Decode(tok->Encode(s)), nfc) << json(s).dump();
  }
  EXPECT_GT(changed, 20u);  // the corpus does exercise composition
}

// ---- byte tokenizer ----

TEST(ByteTokenizer, BytesAreIdsAndSpecialsFollow) {
  auto tok = Tokenizer::Bytes();
  EXPECT_EQ(tok->vocab_size(), kByteVocabSize);
  EXPECT_EQ(tok->bos_id(), kByteBos);
  EXPECT_EQ(tok->eos_id(), kByteEos);
  EXPECT_EQ(tok->pad_id(), kBytePad);
  std::string text = "h\xC3\xA9 \t\n";
  std::vector<int32_t> expected(text.begin(), text.end());
  for (auto& v : expected) v &= 0xFF;
  EXPECT_EQ(tok->Encode(text), expected);
  auto with = tok->Encode(text, true);
  EXPECT_EQ(with.front(), kByteBos);
  EXPECT_EQ(tok->Decode(with), "<|begin_of_text|>" + text);
  EXPECT_EQ(tok->Decode(with, true), text);
  EXPECT_EQ(tok->Encode("a<|end_of_text|>"), (std::vector<int32_t>{'a', kByteEos}));
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{0xE6, 0x97}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->TokenBytes(0xE6), "\xE6");
}

TEST(ByteTokenizer, WrittenFilesLoadAsTheSameTokenizer) {
  auto dir = std::filesystem::temp_directory_path() / ("aha_byte_tok_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(WriteByteTokenizerFiles(dir.string()).ok());
  auto loaded = Tokenizer::Load(dir.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  auto bytes = Tokenizer::Bytes();
  for (std::string s : {"", "hello", "日本 <|pad|> \x01\x7f", "<|begin_of_text|>x"}) {
    EXPECT_EQ((*loaded)->Encode(s, true), bytes->Encode(s, true));
  }
  EXPECT_EQ((*loaded)->eos_id(), kByteEos);
  std::ifstream f(dir / "tokenizer.json");
  json j = json::parse(f);
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_EQ(j["model"]["vocab"].size(), 256u);
  EXPECT_EQ(j["model"]["vocab"]["\u0120"], 32);  // 'Ġ' is the space byte
  EXPECT_FALSE(WriteByteTokenizerFiles((dir / "missing").string()).ok());
  std::filesystem::remove_all(dir);
}

// ---- prompt templates ----

TEST(PromptTemplate, R1ZeroBuiltinIsTable1) {
  auto tmpl = PromptTemplate::Parse("r1-zero");
  ASSERT_TRUE(tmpl.ok());
  std::string s = tmpl->Render("What is 2+2?");
  EXPECT_EQ(s.substr(0, 42), "A conversation between User and Assistant.");
  EXPECT_NE(s.find("<think> reasoning process here </think> <answer> answer here </answer>"), std::string::npos);
  EXPECT_TRUE(s.ends_with("> answer here </answer>. User: What is 2+2?. Assistant:")) << s;
  EXPECT_EQ(PromptTemplate::R1Zero().text(), tmpl->text());
}

TEST(PromptTemplate, SubstitutesEveryPromptAndNothingElse) {
  auto tmpl = PromptTemplate::Parse("Q: {prompt}\nput it in \\boxed{} {x} {{prompt}} / {prompt}");
  ASSERT_TRUE(tmpl.ok());
  EXPECT_EQ(tmpl->Render("1+1"), "Q: 1+1\nput it in \\boxed{} {x} {1+1} / 1+1");
  EXPECT_EQ(tmpl->Render("{prompt}"), "Q: {prompt}\nput it in \\boxed{} {x} {{prompt}} / {prompt}");
  EXPECT_FALSE(PromptTemplate::Parse("no slot here").ok());
  EXPECT_NE(PromptTemplate::Parse("r1zero").status().message().find("r1-zero"), std::string::npos);
  EXPECT_EQ(PromptTemplate::Parse("plain")->Render("x"), "x");
}

// ---- aha tokenize ----

int RunCli(std::vector<std::string> args, const std::string& input, std::string* output) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::istringstream in(input);
  std::ostringstream out;
  int rc = RunTokenize(static_cast<int>(argv.size()), argv.data(), in, out);
  *output = out.str();
  return rc;
}

TEST(TokenizeCommand, EncodesDecodesAndRoundTrips) {
  std::string out;
  ASSERT_EQ(RunCli({"aha tokenize", "--tokenizer", "bytes"}, "hi\n", &out), 0);
  EXPECT_EQ(out, "[104,105,10]\n");
  ASSERT_EQ(RunCli({"aha tokenize", "--tokenizer", "bytes", "--lines", "--add-special"}, "a\nbc\n", &out), 0);
  EXPECT_EQ(out, "[256,97]\n[256,98,99]\n");
  ASSERT_EQ(RunCli({"aha tokenize", "--tokenizer", "bytes", "--decode"}, "[104, 105]", &out), 0);
  EXPECT_EQ(out, "hi");
  ASSERT_EQ(RunCli({"aha tokenize", "--tokenizer", "bytes", "--decode", "--lines", "--skip-special"}, "[256,97]\n\n[98]\n", &out), 0);
  EXPECT_EQ(out, "a\n\nb\n");
  EXPECT_EQ(RunCli({"aha tokenize", "--tokenizer", "bytes", "--decode"}, "[1, 999]", &out), 1);
  EXPECT_EQ(RunCli({"aha tokenize", "--tokenizer", "bytes", "--decode"}, "not json", &out), 1);
  EXPECT_EQ(RunCli({"aha tokenize", "--tokenizer", "/nonexistent/tokenizer.json"}, "x", &out), 1);
}

TEST(TokenizeCommandDeathTest, BadUsageExitsWithCode2) {
  std::string out;
  EXPECT_EXIT(RunCli({"aha tokenize", "--tokenizer", "bytes", "--no-such-flag"}, "", &out), ::testing::ExitedWithCode(2),
              "aha tokenize: error: .*no-such-flag");
  EXPECT_EXIT(std::exit(RunCli({"aha tokenize"}, "", &out)), ::testing::ExitedWithCode(2), "--tokenizer is required");
}

}  // namespace
}  // namespace aha::tokenizer
