#include "common.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>

namespace dhsa {

std::string shape_string(const int64_t* dims, size_t rank) {
  std::string out = "[";
  for (size_t i = 0; i < rank; ++i) {
    if (i) out += ", ";
    out += std::to_string(dims[i]);
  }
  return out + "]";
}

std::string shape_string(const std::vector<int64_t>& dims) { return shape_string(dims.data(), dims.size()); }

const char* dtype_name(DType type) {
  switch (type) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

size_t dtype_size(DType type) { return type == DType::kFloat32 ? 4 : 2; }

namespace {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float value = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return float_of(bits_of(value) | sign);
  }
  if (exponent == 31) return float_of(sign | 0x7f800000u | (mantissa << 13));
  return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) return static_cast<uint16_t>(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (u < 0x38800000u) {  // result is subnormal or zero: let the FPU round (0.5 has ulp 2^-24)
    const float rounded = float_of(u) + 0.5f;
    return static_cast<uint16_t>(sign | (bits_of(rounded) - 0x3f000000u));
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias the exponent (15 - 127) and round to nearest even
  return static_cast<uint16_t>(sign | (u >> 13));
}

inline float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

void to_float(DType type, const void* src, float* dst, size_t count) {
  if (type == DType::kFloat32) {
    if (count) std::memcpy(dst, src, count * 4);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (type == DType::kFloat16)
    for (size_t i = 0; i < count; ++i) dst[i] = half_to_float(s[i]);
  else
    for (size_t i = 0; i < count; ++i) dst[i] = bf16_to_float(s[i]);
}

void from_float(DType type, const float* src, void* dst, size_t count) {
  if (type == DType::kFloat32) {
    if (count) std::memcpy(dst, src, count * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (type == DType::kFloat16)
    for (size_t i = 0; i < count; ++i) d[i] = float_to_half(src[i]);
  else
    for (size_t i = 0; i < count; ++i) d[i] = float_to_bf16(src[i]);
}

int env_threads() {
  const char* value = std::getenv("DHSA_ORT_NUM_THREADS");
  if (value == nullptr || *value == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  if (end == value || *end != '\0' || n < 1 || n > 1024) return 0;
  return static_cast<int>(n);
}

namespace {

struct Job {
  const std::function<void(size_t)>* task = nullptr;
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::string message;
  OrtErrorCode code = ORT_FAIL;

  void record(const std::string& text, OrtErrorCode error_code) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!failed.load()) {
      message = text;
      code = error_code;
      failed.store(true);
    }
  }
};

// Called by ONNX Runtime's thread pool through a C function pointer: nothing may escape.
void run_one(void* data, size_t index) {
  Job* job = static_cast<Job*>(data);
  if (job->failed.load(std::memory_order_relaxed)) return;
  try {
    (*job->task)(index);
  } catch (const Error& e) {
    job->record(e.what(), e.code());
  } catch (const std::bad_alloc&) {
    job->record("dhsa: out of memory", ORT_FAIL);
  } catch (const std::exception& e) {
    job->record(cat("dhsa: ", e.what()), ORT_FAIL);
  } catch (...) {
    job->record("dhsa: unknown error in a worker task", ORT_FAIL);
  }
}

}  // namespace

void Parallel::run(size_t n, const std::function<void(size_t)>& task) const {
  if (n == 0) return;
  Job job;
  job.task = &task;
  const int threads = env_threads();
  if (threads > 0) {
    std::atomic<size_t> next{0};
    auto worker = [&job, &next, n]() noexcept {
      for (size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) run_one(&job, i);
    };
    std::vector<std::thread> pool;
    const size_t extra = std::min<size_t>(static_cast<size_t>(threads) - 1, n - 1);
    try {
      pool.reserve(extra);
      for (size_t t = 0; t < extra; ++t) pool.emplace_back(worker);
    } catch (...) {
      // fewer threads than asked (resource limits): the caller's thread still finishes the work
    }
    worker();
    for (auto& thread : pool) thread.join();
  } else if (n == 1 || api_ == nullptr || context_ == nullptr) {
    for (size_t i = 0; i < n; ++i) run_one(&job, i);
  } else {
    OrtStatus* status = api_->KernelContext_ParallelFor(context_, run_one, n, 0, &job);
    if (status != nullptr) {  // no thread pool API in this build: run on the caller's thread
      api_->ReleaseStatus(status);
      for (size_t i = 0; i < n; ++i) run_one(&job, i);
    }
  }
  if (job.failed.load()) throw Error(job.message, job.code);
}

}  // namespace dhsa
