// IPluginV3 glue of the dhsa ops: one plugin class per op over the C ABI of the CUDA kernels
// (plugins/trt/kernels/dhsa_kernels.h). Plugin name == op name, namespace == "dhsa" (the ONNX
// domain), version "1": the ONNX parser maps a dhsa node to its plugin by those three.
//
// Nothing here runs a kernel itself; every enqueue fills the op's C parameter struct from the
// tensor descriptors and calls dhsa_*_forward. No exception crosses this boundary: every method is
// noexcept, failures return a non-zero status and log one line through TensorRT's logger.
#pragma once

#include <NvInfer.h>
#include <NvInferRuntime.h>

#include <memory>
#include <string>

#include "fields.h"
#include "op_calls.h"

namespace dhsa {
namespace trt {

// Log one error line through the logger TensorRT handed to setLoggerFinder (stderr without one).
void log_error(const std::string& message) noexcept;

// What every dhsa plugin shares: identity, attributes, serialization, capability lookup.
class DhsaPlugin : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::v_2_0::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit DhsaPlugin(Attributes attributes) : attributes_(std::move(attributes)) {}
  ~DhsaPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return attributes_.spec().name; }
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override { return kDomain; }

  // IPluginV3OneBuild (shape checks happen in configurePlugin, with the profile's max dims)
  int32_t getNbOutputs() const noexcept override { return static_cast<int32_t>(attributes_.spec().outputs.size()); }

  // IPluginV3OneRuntime. enqueue is not told how many inputs the node has (optional ones): the
  // count is kept from onShapeChange, which TensorRT calls before enqueue whenever shapes change.
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc*, int32_t nb_inputs, const nvinfer1::PluginTensorDesc*,
                        int32_t) noexcept override {
    if (!check_inputs(nb_inputs)) return -1;
    nb_inputs_ = nb_inputs;
    return 0;
  }
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override {
    return attributes_.serialized();
  }

 protected:
  // Reject a node whose input count the op does not have (required + optional ones).
  bool check_inputs(int32_t nb_inputs) const noexcept;

  Attributes attributes_;
  int32_t nb_inputs_ = 0;  // from configurePlugin / onShapeChange
};

// The kernel side every dhsa plugin shares, over one op's `Call` (op_calls.h): configurePlugin
// validates the profile's max shapes with the kernels' own checks (a bad attribute or shape fails
// the build with its message), getWorkspaceSize asks the kernels for those shapes, enqueue plans the
// actual shapes and calls them.
template <typename Call>
class KernelPlugin : public DhsaPlugin {
 public:
  using DhsaPlugin::DhsaPlugin;
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* outputs, int32_t nb_outputs) noexcept override;
  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* outputs, int32_t nb_outputs) const noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc* output_desc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;

 private:
  // Parameters and workspace bytes for `dims`; false after logging why (`when` says which shapes).
  bool plan(const nvinfer1::Dims* dims, int32_t nb_inputs, nvinfer1::DataType type, typename Call::Params* params,
            size_t* bytes, const char* when, bool log) const noexcept;
};

// Each op's own side: its output types and shapes (expressions), and the formats it accepts.

// dhsa::BlockSparseAttention(query, key, value, block_index, block_count [, key_chunk_offsets]).
class BlockSparseAttentionPlugin final : public KernelPlugin<AttentionCall> {
 public:
  using KernelPlugin::KernelPlugin;
  nvinfer1::IPluginV3* clone() noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputs, int32_t nb_outputs, const nvinfer1::DataType* inputs,
                             int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs*,
                          int32_t, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* io, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
};

// dhsa::Route(query, key [, key_chunk_offsets]) -> (block_index, block_count).
class RoutePlugin final : public KernelPlugin<RouteCall> {
 public:
  using KernelPlugin::KernelPlugin;
  nvinfer1::IPluginV3* clone() noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputs, int32_t nb_outputs, const nvinfer1::DataType* inputs,
                             int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs*,
                          int32_t, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* io, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
};

// dhsa::ChunkOffsets(key [, boundary_probs]) -> key_chunk_offsets [B, nC + 1]. nC + 1 is data
// dependent: the plugin has a second output, the int64 size tensor of that width (declared with
// IExprBuilder::declareSizeTensor, upper bound L + 1), which TensorRT uses to size the first.
class ChunkOffsetsPlugin final : public KernelPlugin<ChunkOffsetsCall> {
 public:
  using KernelPlugin::KernelPlugin;
  int32_t getNbOutputs() const noexcept override { return 2; }
  nvinfer1::IPluginV3* clone() noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputs, int32_t nb_outputs, const nvinfer1::DataType* inputs,
                             int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs*,
                          int32_t, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* io, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
};

// Creates one op's plugin from fields (ONNX attributes at build, serialized fields at runtime).
template <typename Plugin>
class DhsaPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  explicit DhsaPluginCreator(const OpSpec& spec) : spec_(&spec), names_(spec) {}
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fields,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return names_.collection(); }
  const char* getPluginName() const noexcept override { return spec_->name; }
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override { return kDomain; }

 private:
  const OpSpec* spec_;
  FieldNames names_;
};

}  // namespace trt
}  // namespace dhsa
