// AHA_CHECK and friends: assertions for bugs (never for bad input, which gets a Status).
//
// A failed check prints the condition, the operands of a comparison, extra streamed context, the
// file and the line to stderr, then aborts:
//   AHA_CHECK_EQ(a.size(), b.size()) << "while packing group " << id;
//   -> check failed at engine/pack.cc:42: a.size() == b.size() (3 vs 4) while packing group g7
#pragma once

#include <sstream>
#include <string>

namespace aha::internal {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* condition);
  CheckFailure(const char* file, int line, const char* condition, std::string operands);
  [[noreturn]] ~CheckFailure();
  template <typename T>
  CheckFailure& operator<<(const T& v) {
    if (!has_context_) extra_ << " ";
    has_context_ = true;
    extra_ << v;
    return *this;
  }

 private:
  std::ostringstream extra_;
  bool has_context_ = false;
};

// Lets `AHA_CHECK(c) << x;` compile to nothing extra when c holds.
struct Voidify {
  void operator&(const CheckFailure&) {}
};

template <typename A, typename B>
std::string FormatOperands(const A& a, const B& b) {
  std::ostringstream os;
  os << "(" << a << " vs " << b << ")";
  return os.str();
}

}  // namespace aha::internal

#define AHA_CHECK(cond)                        \
  (cond) ? (void)0                             \
         : ::aha::internal::Voidify() &        \
               ::aha::internal::CheckFailure(__FILE__, __LINE__, #cond)

#define AHA_CHECK_OP(a, b, op)                                                          \
  (((a)op(b))) ? (void)0                                                                \
               : ::aha::internal::Voidify() &                                           \
                     ::aha::internal::CheckFailure(__FILE__, __LINE__, #a " " #op " " #b, \
                                                   ::aha::internal::FormatOperands((a), (b)))

#define AHA_CHECK_EQ(a, b) AHA_CHECK_OP(a, b, ==)
#define AHA_CHECK_NE(a, b) AHA_CHECK_OP(a, b, !=)
#define AHA_CHECK_LT(a, b) AHA_CHECK_OP(a, b, <)
#define AHA_CHECK_LE(a, b) AHA_CHECK_OP(a, b, <=)
#define AHA_CHECK_GT(a, b) AHA_CHECK_OP(a, b, >)
#define AHA_CHECK_GE(a, b) AHA_CHECK_OP(a, b, >=)
#define AHA_CHECK_OK(expr)                                                              \
  do {                                                                                  \
    ::aha::Status aha_check_status_ = ::aha::internal::AsStatus((expr));                \
    AHA_CHECK(aha_check_status_.ok()) << #expr << ": " << aha_check_status_.ToString(); \
  } while (0)
