#include "dhsa_plugins.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <new>

#include "dhsa_kernels.h"

namespace dhsa {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DimensionOperation;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IExprBuilder;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace {

// Route's string attributes, in the order of the C ABI enums (dhsa_export.config.PATTERNS /
// CHUNK_SCORES).
constexpr const char* kPatterns[] = {"topk", "ashape", "vslash", "vslash_blockwise", "dynamic"};
constexpr const char* kChunkScores[] = {"mass", "mean"};

template <size_t N>
int enum_index(const char* const (&names)[N], const std::string& value) {
  for (size_t i = 0; i < N; ++i)
    if (value == names[i]) return static_cast<int>(i);
  return -1;
}

template <size_t N>
std::string joined(const char* const (&names)[N]) {
  std::string out;
  for (size_t i = 0; i < N; ++i) out += (i ? ", " : "") + std::string(names[i]);
  return out;
}

// A non-null address the kernels' shape-only functions never read: with it, "key_chunk_offsets
// given" is said at build time, before any buffer exists.
const int32_t kShapeOnly = 0;

const char* version_string() {
  static const std::string version = std::to_string(kOpsetVersion);
  return version.c_str();
}

// dims -> int32 sizes of a tensor of `rank`; false (with a message) when the rank differs or a size
// is unknown (-1) or does not fit in int32.
bool sizes_of(const Dims& dims, int rank, const char* op, const char* port, int32_t* out, std::string* error) {
  if (dims.nbDims != rank) {
    *error = std::string("dhsa::") + op + ": input '" + port + "' has rank " + std::to_string(dims.nbDims) +
             ", expected " + std::to_string(rank);
    return false;
  }
  for (int i = 0; i < rank; ++i) {
    if (dims.d[i] < 0 || dims.d[i] > 2147483647) {
      *error = std::string("dhsa::") + op + ": input '" + port + "' dimension " + std::to_string(i) + " = " +
               std::to_string(dims.d[i]) + " is unknown or too large";
      return false;
    }
    out[i] = static_cast<int32_t>(dims.d[i]);
  }
  return true;
}

int dtype_code(DataType type) {
  switch (type) {
    case DataType::kHALF: return DHSA_DTYPE_FP16;
    case DataType::kBF16: return DHSA_DTYPE_BF16;
    case DataType::kFLOAT: return DHSA_DTYPE_FP32;
    default: return -1;
  }
}

std::string kernel_error(const char* op, const char* call, int status) {
  return std::string("dhsa::") + op + " " + call + ": " + dhsa_status_string(status) + ": " +
         dhsa_last_error_message();
}

// BlockSparseAttention's C parameters from tensor dims (pointers left for the caller).
bool attention_params(const Dims* dims, int32_t nb_inputs, DataType type, const Attributes& a, DhsaBsaParams* p,
                      std::string* error) {
  const char* op = "BlockSparseAttention";
  int32_t q[4], k[4], v[4], index[4], count[3], offsets[2] = {0, 0};
  if (!sizes_of(dims[0], 4, op, "query", q, error) || !sizes_of(dims[1], 4, op, "key", k, error) ||
      !sizes_of(dims[2], 4, op, "value", v, error) || !sizes_of(dims[3], 4, op, "block_index", index, error) ||
      !sizes_of(dims[4], 3, op, "block_count", count, error) ||
      (nb_inputs == 6 && !sizes_of(dims[5], 2, op, "key_chunk_offsets", offsets, error)))
    return false;
  if (v[3] != q[3] || k[3] != q[3] || v[2] != k[2]) {
    *error = "dhsa::BlockSparseAttention: query D=" + std::to_string(q[3]) + ", key D=" + std::to_string(k[3]) +
             ", value Dv=" + std::to_string(v[3]) + " (Lk " + std::to_string(k[2]) + " vs " +
             std::to_string(v[2]) + "): the kernels need D == Dv and key/value of one length";
    return false;
  }
  *p = DhsaBsaParams{};
  p->key_chunk_offsets = nb_inputs == 6 ? &kShapeOnly : nullptr;
  p->batch = q[0];
  p->num_q_heads = q[1];
  p->num_kv_heads = k[1];
  p->num_route_heads = index[1];
  p->q_len = q[2];
  p->k_len = k[2];
  p->head_dim = q[3];
  p->index_width = index[3];
  p->num_chunks = nb_inputs == 6 ? offsets[1] - 1 : 0;
  p->q_block = static_cast<int32_t>(a.integer("q_block"));
  p->k_block = static_cast<int32_t>(a.integer("k_block"));
  const double scale = a.real("scale");
  p->scale = static_cast<float>(scale != 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(q[3])));
  p->causal = a.integer("causal") != 0 ? 1 : 0;
  p->dtype = dtype_code(type);
  p->variant = DHSA_VARIANT_AUTO;
  return true;
}

// Route's C parameters from tensor dims and attributes (pointers left for the caller).
bool route_params(const Dims* dims, int32_t nb_inputs, DataType type, const Attributes& a, DhsaRouteParams* p,
                  std::string* error) {
  const char* op = "Route";
  int32_t q[4], k[4], offsets[2] = {0, 0};
  if (!sizes_of(dims[0], 4, op, "query", q, error) || !sizes_of(dims[1], 4, op, "key", k, error) ||
      (nb_inputs == 3 && !sizes_of(dims[2], 2, op, "key_chunk_offsets", offsets, error)))
    return false;
  *p = DhsaRouteParams{};
  p->batch = q[0];
  p->num_q_heads = q[1];
  p->num_kv_heads = k[1];
  p->q_len = q[2];
  p->k_len = k[2];
  p->head_dim = q[3];
  p->offsets_width = nb_inputs == 3 ? offsets[1] : 0;
  p->key_chunk_offsets = nb_inputs == 3 ? &kShapeOnly : nullptr;
  p->dtype = dtype_code(type);
  p->q_block = static_cast<int32_t>(a.integer("q_block"));
  p->k_block = static_cast<int32_t>(a.integer("k_block"));
  p->pattern = enum_index(kPatterns, a.text("pattern"));
  p->density = a.real("density");
  p->head_group = static_cast<int32_t>(a.integer("head_group"));
  p->sink_tokens = static_cast<int32_t>(a.integer("sink_tokens"));
  p->local_tokens = static_cast<int32_t>(a.integer("local_tokens"));
  p->instruction_tokens = static_cast<int32_t>(a.integer("instruction_tokens"));
  p->vslash_blockwise_above = static_cast<int32_t>(a.integer("vslash_blockwise_above"));
  p->chunk_score = enum_index(kChunkScores, a.text("chunk_score"));
  return true;
}

void max_dims(const DynamicPluginTensorDesc* desc, int32_t n, Dims* out) {
  for (int32_t i = 0; i < n; ++i) out[i] = desc[i].max;
}

void runtime_dims(const PluginTensorDesc* desc, int32_t n, Dims* out) {
  for (int32_t i = 0; i < n; ++i) out[i] = desc[i].dims;
}

bool linear(const PluginTensorDesc& desc) { return desc.format == TensorFormat::kLINEAR; }

}  // namespace

// ---------------------------------------------------------------------------------------- base

IPluginCapability* DhsaPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::v_2_0::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

const char* DhsaPlugin::getPluginVersion() const noexcept { return version_string(); }

bool DhsaPlugin::check_inputs(int32_t nb_inputs) const noexcept {
  const auto& inputs = attributes_.spec().inputs;
  int32_t required = 0;
  for (const auto& port : inputs) required += port.optional ? 0 : 1;
  if (nb_inputs >= required && nb_inputs <= static_cast<int32_t>(inputs.size())) return true;
  log_error(std::string("dhsa::") + attributes_.spec().name + ": " + std::to_string(nb_inputs) +
            " inputs; the op takes " + std::to_string(required) + " to " + std::to_string(inputs.size()));
  return false;
}

// ---------------------------------------------------------------------------- BlockSparseAttention

IPluginV3* BlockSparseAttentionPlugin::clone() noexcept { return new (std::nothrow) BlockSparseAttentionPlugin(*this); }

int32_t BlockSparseAttentionPlugin::getOutputDataTypes(DataType* outputs, int32_t nb_outputs, const DataType* inputs,
                                                       int32_t nb_inputs) const noexcept {
  if (nb_outputs != 1 || !check_inputs(nb_inputs)) return -1;
  outputs[0] = inputs[0];
  return 0;
}

int32_t BlockSparseAttentionPlugin::getOutputShapes(const DimsExprs* inputs, int32_t nb_inputs, const DimsExprs*,
                                                    int32_t, DimsExprs* outputs, int32_t nb_outputs,
                                                    IExprBuilder&) noexcept {
  if (nb_outputs != 1 || !check_inputs(nb_inputs)) return -1;
  if (inputs[0].nbDims != 4 || inputs[2].nbDims != 4) {
    log_error("dhsa::BlockSparseAttention: query and value must be rank 4 ([B, H, L, D])");
    return -1;
  }
  outputs[0].nbDims = 4;
  outputs[0].d[0] = inputs[0].d[0];
  outputs[0].d[1] = inputs[0].d[1];
  outputs[0].d[2] = inputs[0].d[2];
  outputs[0].d[3] = inputs[2].d[3];
  return 0;
}

bool BlockSparseAttentionPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* io,
                                                           int32_t nb_inputs, int32_t) noexcept {
  const PluginTensorDesc& desc = io[pos].desc;
  if (!linear(desc)) return false;
  if (pos == 0) return desc.type == DataType::kHALF || desc.type == DataType::kBF16;
  if (pos == 1 || pos == 2 || pos == nb_inputs) return desc.type == io[0].desc.type;  // key, value, output
  return desc.type == DataType::kINT32;  // block_index, block_count, key_chunk_offsets
}

int32_t BlockSparseAttentionPlugin::configurePlugin(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                                    const DynamicPluginTensorDesc*, int32_t) noexcept {
  if (!check_inputs(nb_inputs)) return -1;
  nb_inputs_ = nb_inputs;
  Dims dims[6];
  max_dims(inputs, nb_inputs, dims);
  DhsaBsaParams params;
  std::string error;
  if (!attention_params(dims, nb_inputs, inputs[0].desc.type, attributes_, &params, &error)) {
    log_error(error + " (profile max shapes)");
    return -1;
  }
  size_t bytes = 0;
  const int status = dhsa_bsa_workspace_size(&params, &bytes);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error("BlockSparseAttention", "configure (profile max shapes)", status));
    return -1;
  }
  return 0;
}

size_t BlockSparseAttentionPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                                    const DynamicPluginTensorDesc*, int32_t) const noexcept {
  Dims dims[6];
  max_dims(inputs, nb_inputs, dims);
  DhsaBsaParams params;
  std::string error;
  size_t bytes = 0;
  if (attention_params(dims, nb_inputs, inputs[0].desc.type, attributes_, &params, &error))
    dhsa_bsa_workspace_size(&params, &bytes);
  return bytes;
}

int32_t BlockSparseAttentionPlugin::enqueue(const PluginTensorDesc* input_desc, const PluginTensorDesc*,
                                            const void* const* inputs, void* const* outputs, void* workspace,
                                            cudaStream_t stream) noexcept {
  if (!check_inputs(nb_inputs_)) return -1;
  Dims dims[6];
  runtime_dims(input_desc, nb_inputs_, dims);
  DhsaBsaParams params;
  std::string error;
  if (!attention_params(dims, nb_inputs_, input_desc[0].type, attributes_, &params, &error)) {
    log_error(error);
    return -1;
  }
  params.q = inputs[0];
  params.k = inputs[1];
  params.v = inputs[2];
  params.block_index = static_cast<const int32_t*>(inputs[3]);
  params.block_count = static_cast<const int32_t*>(inputs[4]);
  params.key_chunk_offsets = nb_inputs_ == 6 ? static_cast<const int32_t*>(inputs[5]) : nullptr;
  params.out = outputs[0];
  size_t bytes = 0;  // what these shapes need: at most what the profile's max shapes reserved
  int status = dhsa_bsa_workspace_size(&params, &bytes);
  if (status == DHSA_STATUS_OK) status = dhsa_bsa_forward(&params, workspace, bytes, stream);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error("BlockSparseAttention", "enqueue", status));
    return -1;
  }
  return 0;
}

// ------------------------------------------------------------------------------------------- Route

IPluginV3* RoutePlugin::clone() noexcept { return new (std::nothrow) RoutePlugin(*this); }

int32_t RoutePlugin::getOutputDataTypes(DataType* outputs, int32_t nb_outputs, const DataType*,
                                        int32_t nb_inputs) const noexcept {
  if (nb_outputs != 2 || !check_inputs(nb_inputs)) return -1;
  outputs[0] = DataType::kINT32;
  outputs[1] = DataType::kINT32;
  return 0;
}

int32_t RoutePlugin::getOutputShapes(const DimsExprs* inputs, int32_t nb_inputs, const DimsExprs*, int32_t,
                                     DimsExprs* outputs, int32_t nb_outputs, IExprBuilder& builder) noexcept {
  if (nb_outputs != 2 || !check_inputs(nb_inputs)) return -1;
  if (inputs[0].nbDims != 4 || inputs[1].nbDims != 4 || (nb_inputs == 3 && inputs[2].nbDims != 2)) {
    log_error("dhsa::Route: query and key must be rank 4 ([B, H, L, D]), key_chunk_offsets rank 2");
    return -1;
  }
  const bool variable = nb_inputs == 3;
  if (variable && attributes_.text("pattern") != "dynamic") {
    log_error("dhsa::Route: key_chunk_offsets is read by pattern 'dynamic' only, this node has pattern '" +
              attributes_.text("pattern") + "'; drop the input or set pattern=dynamic");
    return -1;
  }
  const auto* head_group = builder.constant(attributes_.integer("head_group"));
  const auto* q_block = builder.constant(attributes_.integer("q_block"));
  const auto* k_block = builder.constant(attributes_.integer("k_block"));
  const auto* routing_heads = builder.operation(DimensionOperation::kFLOOR_DIV, *inputs[0].d[1], *head_group);
  const auto* q_blocks = builder.operation(DimensionOperation::kCEIL_DIV, *inputs[0].d[2], *q_block);
  const auto* chunks = variable
                           ? builder.operation(DimensionOperation::kSUB, *inputs[2].d[1], *builder.constant(1))
                           : builder.operation(DimensionOperation::kCEIL_DIV, *inputs[1].d[2], *k_block);
  outputs[0].nbDims = 4;
  outputs[0].d[0] = inputs[0].d[0];
  outputs[0].d[1] = routing_heads;
  outputs[0].d[2] = q_blocks;
  outputs[0].d[3] = chunks;
  outputs[1].nbDims = 3;
  outputs[1].d[0] = inputs[0].d[0];
  outputs[1].d[1] = routing_heads;
  outputs[1].d[2] = q_blocks;
  return 0;
}

bool RoutePlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* io, int32_t,
                                            int32_t) noexcept {
  const PluginTensorDesc& desc = io[pos].desc;
  if (!linear(desc)) return false;
  if (pos == 0) return dtype_code(desc.type) >= 0;
  if (pos == 1) return desc.type == io[0].desc.type;
  return desc.type == DataType::kINT32;  // key_chunk_offsets, block_index, block_count
}

int32_t RoutePlugin::configurePlugin(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                     const DynamicPluginTensorDesc*, int32_t) noexcept {
  if (!check_inputs(nb_inputs)) return -1;
  nb_inputs_ = nb_inputs;
  Dims dims[3];
  max_dims(inputs, nb_inputs, dims);
  DhsaRouteParams params;
  std::string error;
  if (!route_params(dims, nb_inputs, inputs[0].desc.type, attributes_, &params, &error)) {
    log_error(error + " (profile max shapes)");
    return -1;
  }
  size_t bytes = 0;
  const int status = dhsa_route_workspace_size(&params, &bytes);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error("Route", "configure (profile max shapes)", status));
    return -1;
  }
  return 0;
}

size_t RoutePlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                     const DynamicPluginTensorDesc*, int32_t) const noexcept {
  Dims dims[3];
  max_dims(inputs, nb_inputs, dims);
  DhsaRouteParams params;
  std::string error;
  size_t bytes = 0;
  if (route_params(dims, nb_inputs, inputs[0].desc.type, attributes_, &params, &error))
    dhsa_route_workspace_size(&params, &bytes);
  return bytes;
}

int32_t RoutePlugin::enqueue(const PluginTensorDesc* input_desc, const PluginTensorDesc*, const void* const* inputs,
                             void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  if (!check_inputs(nb_inputs_)) return -1;
  Dims dims[3];
  runtime_dims(input_desc, nb_inputs_, dims);
  DhsaRouteParams params;
  std::string error;
  if (!route_params(dims, nb_inputs_, input_desc[0].type, attributes_, &params, &error)) {
    log_error(error);
    return -1;
  }
  params.q = inputs[0];
  params.k = inputs[1];
  params.key_chunk_offsets = nb_inputs_ == 3 ? static_cast<const int32_t*>(inputs[2]) : nullptr;
  params.block_index = static_cast<int32_t*>(outputs[0]);
  params.block_count = static_cast<int32_t*>(outputs[1]);
  size_t bytes = 0;
  int status = dhsa_route_workspace_size(&params, &bytes);
  if (status == DHSA_STATUS_OK) status = dhsa_route_forward(&params, workspace, bytes, stream);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error("Route", "enqueue", status));
    return -1;
  }
  return 0;
}

// ------------------------------------------------------------------------------------ ChunkOffsets

namespace {

// ChunkOffsets' C parameters from tensor dims and attributes (pointers left for the caller).
bool chunk_offsets_params(const Dims* dims, int32_t nb_inputs, DataType type, const Attributes& a,
                          DhsaChunkOffsetsParams* p, std::string* error) {
  const char* op = "ChunkOffsets";
  int32_t key[4], probs[2] = {0, 0};
  if (!sizes_of(dims[0], 4, op, "key", key, error) ||
      (nb_inputs == 2 && !sizes_of(dims[1], 2, op, "boundary_probs", probs, error)))
    return false;
  if (nb_inputs == 2 && (probs[0] != key[0] || probs[1] != key[2])) {
    *error = "dhsa::ChunkOffsets: boundary_probs is [" + std::to_string(probs[0]) + ", " + std::to_string(probs[1]) +
             "], expected [B, L] = [" + std::to_string(key[0]) + ", " + std::to_string(key[2]) + "]";
    return false;
  }
  *p = DhsaChunkOffsetsParams{};
  p->batch = key[0];
  p->num_kv_heads = key[1];
  p->length = key[2];
  p->head_dim = key[3];
  p->dtype = dtype_code(type);
  p->min_chunk = static_cast<int32_t>(a.integer("min_chunk"));
  p->max_chunk = static_cast<int32_t>(a.integer("max_chunk"));
  p->window = static_cast<int32_t>(a.integer("window"));
  p->threshold = a.real("threshold");
  return true;
}

// The plugin's workspace: the kernels' own, then the padded rows [B, L + 1] and counts [B].
struct ChunkOffsetsWorkspace {
  size_t kernels = 0, rows = 0, counts = 0, total = 0;
};

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

ChunkOffsetsWorkspace chunk_offsets_workspace(const DhsaChunkOffsetsParams& p, size_t kernel_bytes) {
  ChunkOffsetsWorkspace w;
  w.kernels = 0;
  w.rows = align256(kernel_bytes);
  w.counts = w.rows + align256(static_cast<size_t>(p.batch) * (p.length + 1) * sizeof(int32_t));
  w.total = w.counts + align256(static_cast<size_t>(p.batch) * sizeof(int32_t));
  return w;
}

}  // namespace

IPluginV3* ChunkOffsetsPlugin::clone() noexcept { return new (std::nothrow) ChunkOffsetsPlugin(*this); }

int32_t ChunkOffsetsPlugin::getOutputDataTypes(DataType* outputs, int32_t nb_outputs, const DataType*,
                                               int32_t nb_inputs) const noexcept {
  if (nb_outputs != 2 || !check_inputs(nb_inputs)) return -1;
  outputs[0] = DataType::kINT32;
  outputs[1] = DataType::kINT64;
  return 0;
}

int32_t ChunkOffsetsPlugin::getOutputShapes(const DimsExprs* inputs, int32_t nb_inputs, const DimsExprs*, int32_t,
                                            DimsExprs* outputs, int32_t nb_outputs, IExprBuilder& builder) noexcept {
  if (nb_outputs != 2 || !check_inputs(nb_inputs)) return -1;
  if (inputs[0].nbDims != 4) {
    log_error("dhsa::ChunkOffsets: key must be rank 4 ([B, Hkv, L, D])");
    return -1;
  }
  const auto* one = builder.constant(1);
  const auto* upper = builder.operation(DimensionOperation::kSUM, *inputs[0].d[2], *one);  // L + 1
  // a typical width: chunks of the mean allowed length
  const int64_t mean_chunk = std::max<int64_t>(1, (attributes_.integer("min_chunk") + attributes_.integer("max_chunk")) / 2);
  const auto* typical = builder.operation(
      DimensionOperation::kSUM, *builder.operation(DimensionOperation::kCEIL_DIV, *inputs[0].d[2], *builder.constant(mean_chunk)),
      *one);
  const auto* width = builder.declareSizeTensor(1, *typical, *upper);
  if (width == nullptr) {
    log_error("dhsa::ChunkOffsets: TensorRT refused the size tensor of the data-dependent output width");
    return -1;
  }
  outputs[0].nbDims = 2;
  outputs[0].d[0] = inputs[0].d[0];
  outputs[0].d[1] = width;
  outputs[1].nbDims = 0;  // the size tensor: a scalar
  return 0;
}

bool ChunkOffsetsPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* io, int32_t nb_inputs,
                                                   int32_t) noexcept {
  const PluginTensorDesc& desc = io[pos].desc;
  if (!linear(desc)) return false;
  if (pos == 0) return dtype_code(desc.type) >= 0;
  if (pos < nb_inputs) return desc.type == DataType::kFLOAT;  // boundary_probs travel as float32
  return desc.type == (pos == nb_inputs ? DataType::kINT32 : DataType::kINT64);
}

int32_t ChunkOffsetsPlugin::configurePlugin(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                            const DynamicPluginTensorDesc*, int32_t) noexcept {
  if (!check_inputs(nb_inputs)) return -1;
  nb_inputs_ = nb_inputs;
  Dims dims[2];
  max_dims(inputs, nb_inputs, dims);
  DhsaChunkOffsetsParams params;
  std::string error;
  if (!chunk_offsets_params(dims, nb_inputs, inputs[0].desc.type, attributes_, &params, &error)) {
    log_error(error + " (profile max shapes)");
    return -1;
  }
  size_t bytes = 0;
  const int status = dhsa_chunk_offsets_workspace_size(&params, &bytes);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error("ChunkOffsets", "configure (profile max shapes)", status));
    return -1;
  }
  return 0;
}

size_t ChunkOffsetsPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                            const DynamicPluginTensorDesc*, int32_t) const noexcept {
  Dims dims[2];
  max_dims(inputs, nb_inputs, dims);
  DhsaChunkOffsetsParams params;
  std::string error;
  size_t bytes = 0;
  if (!chunk_offsets_params(dims, nb_inputs, inputs[0].desc.type, attributes_, &params, &error) ||
      dhsa_chunk_offsets_workspace_size(&params, &bytes) != DHSA_STATUS_OK)
    return 0;
  return chunk_offsets_workspace(params, bytes).total;
}

int32_t ChunkOffsetsPlugin::enqueue(const PluginTensorDesc* input_desc, const PluginTensorDesc*,
                                    const void* const* inputs, void* const* outputs, void* workspace,
                                    cudaStream_t stream) noexcept {
  if (!check_inputs(nb_inputs_)) return -1;
  Dims dims[2];
  runtime_dims(input_desc, nb_inputs_, dims);
  DhsaChunkOffsetsParams params;
  std::string error;
  if (!chunk_offsets_params(dims, nb_inputs_, input_desc[0].type, attributes_, &params, &error)) {
    log_error(error);
    return -1;
  }
  size_t kernel_bytes = 0;
  int status = dhsa_chunk_offsets_workspace_size(&params, &kernel_bytes);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error("ChunkOffsets", "enqueue", status));
    return -1;
  }
  const ChunkOffsetsWorkspace w = chunk_offsets_workspace(params, kernel_bytes);
  unsigned char* base = static_cast<unsigned char*>(workspace);
  params.key = inputs[0];
  params.boundary_probs = nb_inputs_ == 2 ? static_cast<const float*>(inputs[1]) : nullptr;
  params.offsets = reinterpret_cast<int32_t*>(base + w.rows);
  params.counts = reinterpret_cast<int32_t*>(base + w.counts);
  status = dhsa_chunk_offsets_forward(&params, base + w.kernels, kernel_bytes, stream);
  if (status == DHSA_STATUS_OK)
    status = dhsa_chunk_offsets_pack(params.offsets, params.counts, params.batch, params.length,
                                     static_cast<int32_t*>(outputs[0]), static_cast<int64_t*>(outputs[1]), stream);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error("ChunkOffsets", "enqueue", status));
    return -1;
  }
  return 0;
}

bool validate_route_attributes(const Attributes& attributes, std::string* error) {
  if (enum_index(kPatterns, attributes.text("pattern")) < 0) {
    *error = "dhsa::Route: pattern '" + attributes.text("pattern") + "' is not one of " + joined(kPatterns);
    return false;
  }
  if (enum_index(kChunkScores, attributes.text("chunk_score")) < 0) {
    *error = "dhsa::Route: chunk_score '" + attributes.text("chunk_score") + "' is not one of " +
             joined(kChunkScores);
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------ creator

template <typename Plugin>
IPluginV3* DhsaPluginCreator<Plugin>::createPlugin(const char*, const PluginFieldCollection* fields,
                                                   nvinfer1::TensorRTPhase) noexcept {
  try {
    Attributes attributes(*spec_);
    std::string error;
    if (!attributes.parse(fields, &error) ||
        (spec_ == &route_spec() && !validate_route_attributes(attributes, &error))) {
      log_error(error);
      return nullptr;
    }
    return new Plugin(std::move(attributes));
  } catch (const std::exception& exc) {  // allocation: nothing may cross the library boundary
    log_error(std::string("dhsa::") + spec_->name + ": creating the plugin failed: " + exc.what());
    return nullptr;
  }
}

template <typename Plugin>
const char* DhsaPluginCreator<Plugin>::getPluginVersion() const noexcept {
  return version_string();
}

template class DhsaPluginCreator<BlockSparseAttentionPlugin>;
template class DhsaPluginCreator<RoutePlugin>;
template class DhsaPluginCreator<ChunkOffsetsPlugin>;

}  // namespace trt
}  // namespace dhsa
