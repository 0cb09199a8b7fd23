// `aha tokenize`.
#include "engine/tokenizer/tokenize_command.h"

#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/flags.h"
#include "engine/tokenizer/tokenizer.h"

namespace aha::tokenizer {
namespace {

void PrintIds(const std::vector<int32_t>& ids, std::ostream& out) {
  out << '[';
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out << ',';
    out << ids[i];
  }
  out << "]\n";
}

Result<std::vector<int32_t>> ParseIds(std::string_view text, const Tokenizer& tok, const std::string& where) {
  auto j = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_array()) return InvalidArgument(where + ": expected a JSON array of token ids");
  std::vector<int32_t> ids;
  ids.reserve(j.size());
  for (const auto& v : j) {
    if (!v.is_number_integer()) return InvalidArgument(where + ": expected a JSON array of token ids");
    int64_t id = v.get<int64_t>();
    if (id < 0 || id >= tok.vocab_size() || tok.TokenBytes(static_cast<int32_t>(id)).empty())
      return InvalidArgument(where + ": " + std::to_string(id) + " is not a token id");
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

}  // namespace

int RunTokenize(int argc, char** argv, std::istream& in, std::ostream& out) {
  std::string tokenizer_path;
  bool lines = false, add_special = false, decode = false, skip_special = false;
  FlagSet flags(argv[0], "Encode stdin to token ids (a JSON array), or decode ids to text.");
  flags.String("tokenizer", &tokenizer_path, "tokenizer.json, a model directory, or 'bytes' (required)");
  flags.Bool("lines", &lines, "one JSON array per input line (the newline is not encoded)");
  flags.Bool("add-special", &add_special, "apply the post-processor (e.g. BOS), like add_special_tokens=True");
  flags.Bool("decode", &decode, "read JSON arrays of ids, print text");
  flags.Bool("skip-special", &skip_special, "with --decode: drop special tokens");
  flags.Epilog("examples:\n  echo 'Hello world' | aha tokenize --tokenizer models/qwen3\n"
               "  echo '[9707,1879]' | aha tokenize --tokenizer models/qwen3 --decode");
  ParseOrExit(flags, argc, argv);
  const std::string program = flags.program();
  if (tokenizer_path.empty()) return Fail(program, "--tokenizer is required", 2);

  std::unique_ptr<Tokenizer> tok;
  if (tokenizer_path == "bytes") {
    tok = Tokenizer::Bytes();
  } else {
    auto loaded = Tokenizer::Load(tokenizer_path);
    if (!loaded.ok()) return Fail(program, loaded.status().message());
    tok = std::move(loaded).value();
  }

  std::string input((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string_view> records;
  if (lines) {
    std::string_view rest = input;
    while (!rest.empty()) {
      size_t nl = rest.find('\n');
      records.push_back(rest.substr(0, nl));
      rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    }
  } else {
    records.push_back(input);
  }

  for (size_t i = 0; i < records.size(); ++i) {
    if (!decode) {
      PrintIds(tok->Encode(records[i], add_special), out);
      continue;
    }
    if (lines && records[i].find_first_not_of(" \t\r") == std::string_view::npos) {
      out << "\n";  // an empty line decodes to an empty line
      continue;
    }
    auto ids = ParseIds(records[i], *tok, lines ? "stdin line " + std::to_string(i + 1) : "stdin");
    if (!ids.ok()) return Fail(program, ids.status().message());
    out << tok->Decode(*ids, skip_special);
    if (lines) out << "\n";
  }
  out.flush();
  return 0;
}

int RunTokenizeCommand(int argc, char** argv) { return RunTokenize(argc, argv, std::cin, std::cout); }

}  // namespace aha::tokenizer
