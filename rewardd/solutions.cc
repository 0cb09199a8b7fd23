#include "rewardd/solutions.h"

#include <fstream>

#include <nlohmann/json.hpp>

namespace aha::rewardd {
namespace {

uint64_t SplitMix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

int64_t WrongResult(int64_t c, uint64_t& rng) {
  switch (SplitMix(rng) % 4) {
    case 0: return c + 1;
    case 1: return c - 1 >= 0 ? c - 1 : c + 2;
    case 2: return c + 10;
    default: {
      std::string s = std::to_string(c);
      if (s.size() >= 2 && s[s.size() - 1] != s[s.size() - 2]) {
        std::swap(s[s.size() - 1], s[s.size() - 2]);
        if (s[0] != '0' && s[0] != '-') return std::stoll(s);
      }
      return c + 11;
    }
  }
}

}  // namespace

Result<int64_t> WriteColdStartSolutions(const std::string& in_path, const std::string& out_path,
                                        const SolutionOptions& options) {
  if (options.wrong_fraction < 0 || options.wrong_fraction > 1) return InvalidArgument("wrong fraction must be in [0, 1]");
  std::ifstream in(in_path);
  if (!in) return NotFound(in_path + ": cannot open");
  std::ofstream out(out_path);
  if (!out) return IoError(out_path + ": cannot write");
  uint64_t rng = options.seed * 0x2545f4914f6cdd1dull + 1;
  int64_t written = 0, n = 0;
  for (std::string line; std::getline(in, line);) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    std::string where = in_path + ":" + std::to_string(n);
    if (j.is_discarded() || !j.is_object() || !j.contains("prompt") || !j["prompt"].is_string() || !j.contains("kind"))
      return InvalidArgument(where + ": not a task record (docs/data.md)");
    bool wrong = static_cast<double>(SplitMix(rng) % 1000000) / 1e6 < options.wrong_fraction;
    std::string kind = j["kind"].is_string() ? j["kind"].get<std::string>() : "";
    std::string think, answer;
    if (kind == "arith") {
      const auto& m = j.value("metadata", nlohmann::json::object());
      if (!m.contains("a") || !m.contains("b") || !m.contains("op") || !m["a"].is_number_integer() ||
          !m["b"].is_number_integer() || !m["op"].is_string())
        return InvalidArgument(where + ": field 'metadata': arith needs integer a, b and op");
      int64_t a = m["a"].get<int64_t>(), b = m["b"].get<int64_t>();
      std::string op = m["op"].get<std::string>();
      int64_t c = op == "+" ? a + b : op == "-" ? a - b : op == "*" ? a * b : 0;
      if (op != "+" && op != "-" && op != "*") return InvalidArgument(where + ": field 'metadata.op': '" + op + "' is not + - *");
      if (op == "+" && a >= 0 && b >= 0 && a < 100 && b < 100) {
        // Column addition, units first, the way a small model can learn it: single-digit facts and a
        // carry, then the answer assembled from the steps ("8 + 7 = 15 , 4 + 3 + 1 = 8" -> 85).
        int64_t units = a % 10 + b % 10;
        int64_t carry = units >= 10 ? 1 : 0;
        int64_t tens = a / 10 + b / 10 + carry;
        if (wrong) {  // a weak teacher's slip in one column, carried through to the answer
          if (SplitMix(rng) % 2) units = units > 0 ? units - 1 : units + 1;
          else tens = tens > 0 ? tens - 1 : tens + 1;
        }
        think = std::to_string(a % 10) + " + " + std::to_string(b % 10) + " = " + std::to_string(units) + " , " +
                std::to_string(a / 10) + " + " + std::to_string(b / 10) + (carry ? " + 1" : "") + " = " + std::to_string(tens);
        answer = (tens ? std::to_string(tens) : "") + std::to_string(units % 10);
      } else {
        if (wrong) c = WrongResult(c, rng);
        think = std::to_string(a) + " " + op + " " + std::to_string(b) + " = " + std::to_string(c);
        answer = std::to_string(c);
      }
    } else if (kind == "countdown") {
      if (!j.contains("answer") || !j["answer"].is_string()) return InvalidArgument(where + ": field 'answer': missing");
      answer = j["answer"].get<std::string>();
      const auto& m = j.value("metadata", nlohmann::json::object());
      int64_t target = m.value("target", int64_t{0});
      if (wrong) {
        // A weak teacher's near miss: the right numbers, one operator changed.
        for (char& ch : answer)
          if (ch == '+' || ch == '-') {
            ch = ch == '+' ? '-' : '+';
            break;
          }
      }
      think = answer + " = " + std::to_string(target);
    } else {
      continue;
    }
    out << nlohmann::json{{"prompt", j["prompt"]}, {"completion", " <think> " + think + " </think> <answer> " + answer + " </answer>"}}.dump()
        << "\n";
    ++written;
  }
  return written;
}

}  // namespace aha::rewardd
