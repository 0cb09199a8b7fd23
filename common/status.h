// Status and Result<T>: expected failures as values (Reverb/Abseil style).
//
// A Status is ok or carries a code and a one-line message. Result<T> holds a T or a non-ok Status.
// Use RETURN_IF_ERROR(expr) and ASSIGN_OR_RETURN(lhs, expr) to propagate, and the named predicates
// (IsTimeout, IsNotFound, ...) to branch on a failure. Bugs are not Statuses: use AHA_CHECK (check.h).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "common/check.h"

namespace aha {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,    // bad input: job file, flag, dataset line, wire message
  kNotFound,
  kAlreadyExists,
  kOutOfRange,
  kTimeout,            // a deadline passed
  kUnavailable,        // peer not reachable, or backpressure: try again later
  kResourceExhausted,  // a bound was hit (outbox full, size limit)
  kFailedPrecondition,
  kCancelled,          // stopped by request (shutdown)
  kDataLoss,           // corrupt stored or received data
  kUnimplemented,
  kInternal,
  kIoError,
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "code: message", or "ok".
  std::string ToString() const;
  // Prefixes the message with context ("loading job.yaml: ..."); no-op on ok.
  Status WithContext(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status OkStatus() { return Status(); }
inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
inline Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status Timeout(std::string m) { return {StatusCode::kTimeout, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
inline Status DataLoss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status Unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }

inline bool IsInvalidArgument(const Status& s) { return s.code() == StatusCode::kInvalidArgument; }
inline bool IsNotFound(const Status& s) { return s.code() == StatusCode::kNotFound; }
inline bool IsAlreadyExists(const Status& s) { return s.code() == StatusCode::kAlreadyExists; }
inline bool IsOutOfRange(const Status& s) { return s.code() == StatusCode::kOutOfRange; }
inline bool IsTimeout(const Status& s) { return s.code() == StatusCode::kTimeout; }
inline bool IsUnavailable(const Status& s) { return s.code() == StatusCode::kUnavailable; }
inline bool IsResourceExhausted(const Status& s) { return s.code() == StatusCode::kResourceExhausted; }
inline bool IsFailedPrecondition(const Status& s) { return s.code() == StatusCode::kFailedPrecondition; }
inline bool IsCancelled(const Status& s) { return s.code() == StatusCode::kCancelled; }
inline bool IsDataLoss(const Status& s) { return s.code() == StatusCode::kDataLoss; }

// A T or a non-ok Status. Accessing the value of a failed Result is a bug and aborts.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    AHA_CHECK(!std::get<Status>(v_).ok()) << "Result built from an ok Status";
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status() : std::get<Status>(v_); }

  T& value() & { Check(); return std::get<T>(v_); }
  const T& value() const& { Check(); return std::get<T>(v_); }
  T&& value() && { Check(); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  void Check() const {
    AHA_CHECK(ok()) << "value() of a failed Result: " << std::get<Status>(v_).ToString();
  }
  std::variant<T, Status> v_;
};

namespace internal {
inline Status AsStatus(Status s) { return s; }
template <typename T>
Status AsStatus(const Result<T>& r) { return r.status(); }
}  // namespace internal

}  // namespace aha

#define AHA_CONCAT_INNER(a, b) a##b
#define AHA_CONCAT(a, b) AHA_CONCAT_INNER(a, b)

// Returns the Status of `expr` from the enclosing function when it is not ok.
#define RETURN_IF_ERROR(expr)                                              \
  do {                                                                     \
    ::aha::Status aha_status_ = ::aha::internal::AsStatus((expr));         \
    if (!aha_status_.ok()) return aha_status_;                             \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, F())`: binds the value of a Result or returns its Status.
#define ASSIGN_OR_RETURN(lhs, expr) \
  AHA_ASSIGN_OR_RETURN_IMPL(AHA_CONCAT(aha_result_, __LINE__), lhs, expr)
#define AHA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
