#pragma once
// Typed errors of the core. The binding maps each one to a Python exception of the same name,
// so a caller can tell an exhausted pool from a bad argument. Messages name the value and the
// limit it broke.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace infercept {

/// Base of every error the core throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A pool cannot satisfy an allocation (the caller asked for more blocks than are free).
class OutOfBlocksError : public Error {
 public:
  using Error::Error;
};

/// A block id was misused: out of range, freed twice, retained while free.
class BlockError : public Error {
 public:
  using Error::Error;
};

/// An operation is not legal in the request's current state (e.g. resuming a running request).
class StateError : public Error {
 public:
  using Error::Error;
};

/// No request with that id is known (never added, or already removed).
class UnknownRequestError : public Error {
 public:
  using Error::Error;
};

/// An argument is outside its valid range (a negative token count, a request larger than the
/// whole KV pool, a malformed cost profile).
class InvalidArgumentError : public Error {
 public:
  using Error::Error;
};

/// Throws InvalidArgumentError "op: what": the one spelling of an argument error of the
/// kernels and engines (`op` is the function or component, `what` names the value and limit).
[[noreturn]] inline void throw_invalid_argument(const char* op, const std::string& what) {
  throw InvalidArgumentError(std::string(op) + ": " + what);
}

/// Throws InvalidArgumentError "op: name=value must be > 0" unless value > 0.
inline void check_positive(const char* op, const char* name, int64_t value) {
  if (value <= 0) throw_invalid_argument(op, std::string(name) + "=" + std::to_string(value) + " must be > 0");
}

}  // namespace infercept
