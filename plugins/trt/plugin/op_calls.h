// From TensorRT tensor descriptions to the kernels' C ABI, one struct per op: the parameters a set of
// input dims and attributes means (`plan`), the workspace they need (`workspace`) and the call on
// real buffers (`run`). The plugins (dhsa_plugins.h) use them the same way at build time (the
// profile's max shapes: validation and workspace size) and at run time (the actual shapes).
#pragma once

#include <NvInfer.h>
#include <NvInferRuntime.h>

#include <cstddef>
#include <string>

#include "dhsa_kernels.h"
#include "fields.h"

namespace dhsa {
namespace trt {

// "dhsa::<op> <call>: <status>: <the kernels' last message>"
std::string kernel_error(const char* op, const char* call, int status);

// DHSA_DTYPE_* of a TensorRT type, -1 for one the kernels do not take.
int dtype_code(nvinfer1::DataType type);

// Route's string attributes as the C ABI enums (-1 if unknown), and the check made at creation.
int route_pattern(const std::string& name);
int route_chunk_score(const std::string& name);
bool validate_route_attributes(const Attributes& attributes, std::string* error);

struct AttentionCall {
  static constexpr const char* kOp = "BlockSparseAttention";
  static constexpr int kMaxInputs = 6;
  using Params = DhsaBsaParams;
  static bool plan(const nvinfer1::Dims* dims, int32_t nb_inputs, nvinfer1::DataType type, const Attributes& a,
                   Params* p, std::string* error);
  static int workspace(const Params& p, size_t* bytes) { return dhsa_bsa_workspace_size(&p, bytes); }
  static int run(Params& p, int32_t nb_inputs, const void* const* inputs, void* const* outputs, void* workspace,
                 size_t bytes, cudaStream_t stream);
};

struct RouteCall {
  static constexpr const char* kOp = "Route";
  static constexpr int kMaxInputs = 3;
  using Params = DhsaRouteParams;
  static bool plan(const nvinfer1::Dims* dims, int32_t nb_inputs, nvinfer1::DataType type, const Attributes& a,
                   Params* p, std::string* error);
  static int workspace(const Params& p, size_t* bytes) { return dhsa_route_workspace_size(&p, bytes); }
  static int run(Params& p, int32_t nb_inputs, const void* const* inputs, void* const* outputs, void* workspace,
                 size_t bytes, cudaStream_t stream);
};

// ChunkOffsets' workspace is the kernels' own, then the padded rows [B, L + 1] and counts [B] that
// dhsa_chunk_offsets_pack packs into the output at the longest row's width.
struct ChunkOffsetsCall {
  static constexpr const char* kOp = "ChunkOffsets";
  static constexpr int kMaxInputs = 2;
  using Params = DhsaChunkOffsetsParams;
  static bool plan(const nvinfer1::Dims* dims, int32_t nb_inputs, nvinfer1::DataType type, const Attributes& a,
                   Params* p, std::string* error);
  static int workspace(const Params& p, size_t* bytes);
  static int run(Params& p, int32_t nb_inputs, const void* const* inputs, void* const* outputs, void* workspace,
                 size_t bytes, cudaStream_t stream);
};

}  // namespace trt
}  // namespace dhsa
