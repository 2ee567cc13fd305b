#include "dhsa_plugins.h"

#include <algorithm>
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

const char* version_string() {
  static const std::string version = std::to_string(kOpsetVersion);
  return version.c_str();
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

// --------------------------------------------------------------------------------- kernel side

template <typename Call>
bool KernelPlugin<Call>::plan(const Dims* dims, int32_t nb_inputs, DataType type, typename Call::Params* params,
                              size_t* bytes, const char* when, bool log) const noexcept {
  std::string error;
  if (!Call::plan(dims, nb_inputs, type, attributes_, params, &error)) {
    if (log) log_error(error + " (" + when + ")");
    return false;
  }
  const int status = Call::workspace(*params, bytes);
  if (status != DHSA_STATUS_OK) {
    if (log) log_error(kernel_error(Call::kOp, when, status));
    return false;
  }
  return true;
}

template <typename Call>
int32_t KernelPlugin<Call>::configurePlugin(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                            const DynamicPluginTensorDesc*, int32_t) noexcept {
  if (!check_inputs(nb_inputs)) return -1;
  nb_inputs_ = nb_inputs;
  Dims dims[Call::kMaxInputs];
  max_dims(inputs, nb_inputs, dims);
  typename Call::Params params;
  size_t bytes = 0;
  return plan(dims, nb_inputs, inputs[0].desc.type, &params, &bytes, "configure, profile max shapes", true) ? 0 : -1;
}

template <typename Call>
size_t KernelPlugin<Call>::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                                            const DynamicPluginTensorDesc*, int32_t) const noexcept {
  if (nb_inputs < 1 || nb_inputs > Call::kMaxInputs) return 0;
  Dims dims[Call::kMaxInputs];
  max_dims(inputs, nb_inputs, dims);
  typename Call::Params params;
  size_t bytes = 0;
  return plan(dims, nb_inputs, inputs[0].desc.type, &params, &bytes, "workspace", false) ? bytes : 0;
}

template <typename Call>
int32_t KernelPlugin<Call>::enqueue(const PluginTensorDesc* input_desc, const PluginTensorDesc*,
                                    const void* const* inputs, void* const* outputs, void* workspace,
                                    cudaStream_t stream) noexcept {
  if (!check_inputs(nb_inputs_)) return -1;
  Dims dims[Call::kMaxInputs];
  runtime_dims(input_desc, nb_inputs_, dims);
  typename Call::Params params;
  size_t bytes = 0;  // what these shapes need: at most what the profile's max shapes reserved
  if (!plan(dims, nb_inputs_, input_desc[0].type, &params, &bytes, "enqueue", true)) return -1;
  const int status = Call::run(params, nb_inputs_, inputs, outputs, workspace, bytes, stream);
  if (status != DHSA_STATUS_OK) {
    log_error(kernel_error(Call::kOp, "enqueue", status));
    return -1;
  }
  return 0;
}

template class KernelPlugin<AttentionCall>;
template class KernelPlugin<RouteCall>;
template class KernelPlugin<ChunkOffsetsCall>;

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

// ------------------------------------------------------------------------------------ ChunkOffsets

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
  const int64_t mean_chunk =
      std::max<int64_t>(1, (attributes_.integer("min_chunk") + attributes_.integer("max_chunk")) / 2);
  const auto* chunks = builder.operation(DimensionOperation::kCEIL_DIV, *inputs[0].d[2], *builder.constant(mean_chunk));
  const auto* typical = builder.operation(DimensionOperation::kSUM, *chunks, *one);
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
