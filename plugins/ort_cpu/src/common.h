// Shared helpers of the glue code: errors, element types, fp16/bf16 conversion, parallel loops.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace dhsa {

// Every problem is thrown as Error inside the library and turned into an OrtStatus at the
// boundary (CreateKernelV2, KernelComputeV2, RegisterCustomOps); nothing else crosses it.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, OrtErrorCode code = ORT_INVALID_ARGUMENT)
      : std::runtime_error(message), code_(code) {}
  OrtErrorCode code() const { return code_; }

 private:
  OrtErrorCode code_;
};

// Builds a message from pieces: fail("x ", 3, " is bad") throws Error("x 3 is bad").
std::string shape_string(const int64_t* dims, size_t rank);
std::string shape_string(const std::vector<int64_t>& dims);

template <typename... Parts>
std::string cat(const Parts&... parts);

enum class DType { kFloat32, kFloat16, kBFloat16 };
const char* dtype_name(DType type);
size_t dtype_size(DType type);

// Element conversion (round to nearest even on the way down).
void to_float(DType type, const void* src, float* dst, size_t count);
void from_float(DType type, const float* src, void* dst, size_t count);

// Parallel loop over [0, n) on ONNX Runtime's intra-op thread pool (the session's
// intra_op_num_threads), or on DHSA_ORT_NUM_THREADS private threads when that variable is set.
// The first exception thrown by a task is rethrown (as Error) after all tasks finished.
class Parallel {
 public:
  Parallel(const OrtApi* api, const OrtKernelContext* context) : api_(api), context_(context) {}
  void run(size_t n, const std::function<void(size_t)>& task) const;

 private:
  const OrtApi* api_;
  const OrtKernelContext* context_;
};

// Threads requested through DHSA_ORT_NUM_THREADS (0 when unset or invalid).
int env_threads();

// ---------------------------------------------------------------------------------------------
namespace detail {
inline void append(std::string& out, const std::string& s) { out += s; }
inline void append(std::string& out, const char* s) { out += s; }
inline void append(std::string& out, char c) { out += c; }
inline void append(std::string& out, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  out += buf;
}
inline void append(std::string& out, float v) { append(out, static_cast<double>(v)); }
template <typename T>
inline void append(std::string& out, const T& v) {
  out += std::to_string(v);
}
}  // namespace detail

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  (detail::append(out, parts), ...);
  return out;
}

}  // namespace dhsa
