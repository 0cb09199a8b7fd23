// Runs a libFuzzer target without libFuzzer (gcc builds, CI): every seed file given on the
// command line, then `--iterations` random mutations of them (byte flips, truncation, splices,
// random bytes), with a fixed seed. Coverage-guided fuzzing runs with clang: scripts/fuzz.sh.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  long iterations = 20000;
  std::vector<std::string> seeds;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--iterations=", 13) == 0) {
      iterations = std::atol(argv[i] + 13);
      continue;
    }
    std::ifstream f(argv[i], std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "fuzz_driver: error: cannot read seed %s\n", argv[i]);
      return 2;
    }
    std::stringstream s;
    s << f.rdbuf();
    seeds.push_back(s.str());
  }
  if (seeds.empty()) seeds.push_back("");
  for (const auto& s : seeds) LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  std::mt19937_64 rng(12345);
  for (long i = 0; i < iterations; ++i) {
    std::string in = seeds[rng() % seeds.size()];
    switch (rng() % 5) {
      case 0:  // flip bytes
        for (int k = 0, n = 1 + rng() % 8; k < n && !in.empty(); ++k) in[rng() % in.size()] = static_cast<char>(rng());
        break;
      case 1:  // truncate
        if (!in.empty()) in.resize(rng() % in.size());
        break;
      case 2: {  // splice two seeds
        const std::string& other = seeds[rng() % seeds.size()];
        in = in.substr(0, in.empty() ? 0 : rng() % in.size()) + other.substr(other.empty() ? 0 : rng() % other.size());
        break;
      }
      case 3:  // random bytes
        in.assign(rng() % 512, '\0');
        for (auto& c : in) c = static_cast<char>(rng());
        break;
      default:  // insert a run
        in.insert(in.empty() ? 0 : rng() % in.size(), std::string(rng() % 64, static_cast<char>(rng())));
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(in.data()), in.size());
  }
  std::printf("fuzz_driver: %zu seeds, %ld mutations, no crash\n", seeds.size(), iterations);
  return 0;
}
