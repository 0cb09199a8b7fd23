// Shared by the GPU tests: fresh random inputs (a new seed every run, so a kernel must compute the
// same function on any input) and the NMSE check, ||got - ref||^2 / ||ref||^2, printed per op.
// A non-finite element (an output the kernel never wrote, poisoned with NaN) fails the check.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace aha::engine::test {

inline uint64_t NextSeed() {
  static uint64_t seed = std::random_device{}();
  return seed++;
}

inline std::vector<float> Randn(size_t n, float scale = 1.0f) {
  std::mt19937_64 rng(NextSeed());
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline std::vector<int32_t> RandInt(size_t n, int lo, int hi) {
  std::mt19937_64 rng(NextSeed());
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline double Nmse(const std::vector<float>& got, const std::vector<float>& ref) {
  if (got.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den == 0 ? num : num / den;
}

// Prints "op  shape  nmse E  (limit L)" and expects E <= limit.
inline void ExpectNmse(const std::string& op, const std::string& shape, const std::vector<float>& got,
                       const std::vector<float>& ref, double limit) {
  const double e = Nmse(got, ref);
  std::cout << "  " << op << std::string(op.size() < 28 ? 28 - op.size() : 1, ' ') << shape
            << std::string(shape.size() < 40 ? 40 - shape.size() : 1, ' ') << "nmse " << e << "  (limit " << limit
            << ")\n";
  EXPECT_LE(e, limit) << op << " " << shape;
}

}  // namespace aha::engine::test
