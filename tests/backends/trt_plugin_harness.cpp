// Drives one dhsa TensorRT plugin the way TensorRT does, without TensorRT (none runs on the GPU
// machine): load the library, find the creator, create the plugin from fields typed as the ONNX
// parser types them, configure it and ask its workspace size (build phase), serialize its fields and
// create the runtime plugin from them (what deserializing an engine does), then onShapeChange and
// enqueue on real device buffers. Errors the plugin logs are captured through setLoggerFinder.
//
// Built by tests/backends/test_trt_plugin_cuda.py with nvcc against the same TensorRT headers.
#include <NvInfer.h>
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace nvinfer1;

class CapturingLogger : public ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) messages += std::string(msg) + "\n";
  }
  std::string messages;
};

class Finder : public ILoggerFinder {
 public:
  ILogger* findLogger() override { return &logger; }
  CapturingLogger logger;
};

Finder g_finder;

int fail(char* error, int error_len, const std::string& what) {
  const std::string text = what + (g_finder.logger.messages.empty() ? "" : ": " + g_finder.logger.messages);
  std::snprintf(error, static_cast<size_t>(error_len), "%s", text.c_str());
  return 1;
}

Dims make_dims(const int64_t* values, int rank) {
  Dims dims{};
  dims.nbDims = rank;
  for (int i = 0; i < rank; ++i) dims.d[i] = values[i];
  return dims;
}

}  // namespace

// kinds: 0 int (kINT32), 1 float (kFLOAT32), 2 string (kCHAR) - as the ONNX parser passes them.
// types: TensorRT DataType numbers. dims: 8 values per tensor (rank of them used).
extern "C" int harness_run(const char* plugin_path, const char* op, int nb_fields, const char* const* names,
                           const int* kinds, const double* numbers, const char* const* texts, int nb_inputs,
                           const void* const* inputs, const int64_t* dims, const int* ranks, const int* types,
                           int nb_outputs, void* const* outputs, const int64_t* out_dims, const int* out_ranks,
                           const int* out_types, void* stream, char* error, int error_len) {
  g_finder.logger.messages.clear();
  void* handle = dlopen(plugin_path, RTLD_NOW | RTLD_LOCAL);
  if (!handle) return fail(error, error_len, std::string("dlopen: ") + dlerror());
  using SetFinder = void (*)(ILoggerFinder*);
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  auto set_finder = reinterpret_cast<SetFinder>(dlsym(handle, "setLoggerFinder"));
  auto get_creators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
  if (!set_finder || !get_creators) return fail(error, error_len, "setLoggerFinder / getCreators not exported");
  set_finder(&g_finder);
  int32_t count = 0;
  IPluginCreatorInterface* const* list = get_creators(count);
  IPluginCreatorV3One* creator = nullptr;
  for (int32_t i = 0; i < count; ++i) {
    auto* candidate = static_cast<IPluginCreatorV3One*>(list[i]);
    if (std::strcmp(candidate->getPluginName(), op) == 0) creator = candidate;
  }
  if (!creator) return fail(error, error_len, std::string("no creator named ") + op);

  std::vector<int32_t> ints(nb_fields);
  std::vector<float> floats(nb_fields);
  std::vector<PluginField> fields;
  for (int i = 0; i < nb_fields; ++i) {
    if (kinds[i] == 0) {
      ints[i] = static_cast<int32_t>(numbers[i]);
      fields.emplace_back(names[i], &ints[i], PluginFieldType::kINT32, 1);
    } else if (kinds[i] == 1) {
      floats[i] = static_cast<float>(numbers[i]);
      fields.emplace_back(names[i], &floats[i], PluginFieldType::kFLOAT32, 1);
    } else {
      fields.emplace_back(names[i], texts[i], PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(texts[i])));
    }
  }
  PluginFieldCollection collection{static_cast<int32_t>(fields.size()), fields.data()};
  IPluginV3* built = creator->createPlugin(op, &collection, TensorRTPhase::kBUILD);
  if (!built) return fail(error, error_len, "createPlugin (build) returned null");

  std::vector<DynamicPluginTensorDesc> in_dyn(nb_inputs), out_dyn(nb_outputs);
  std::vector<PluginTensorDesc> in_desc(nb_inputs), out_desc(nb_outputs);
  for (int i = 0; i < nb_inputs; ++i) {
    in_desc[i].dims = make_dims(dims + 8 * i, ranks[i]);
    in_desc[i].type = static_cast<DataType>(types[i]);
    in_desc[i].format = TensorFormat::kLINEAR;
    in_dyn[i] = DynamicPluginTensorDesc{in_desc[i], in_desc[i].dims, in_desc[i].dims, in_desc[i].dims};
  }
  for (int i = 0; i < nb_outputs; ++i) {
    out_desc[i].dims = make_dims(out_dims + 8 * i, out_ranks[i]);
    out_desc[i].type = static_cast<DataType>(out_types[i]);
    out_desc[i].format = TensorFormat::kLINEAR;
    out_dyn[i] = DynamicPluginTensorDesc{out_desc[i], out_desc[i].dims, out_desc[i].dims, out_desc[i].dims};
  }
  auto* build = static_cast<v_2_0::IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
  for (int pos = 0; pos < nb_inputs + nb_outputs; ++pos) {
    std::vector<DynamicPluginTensorDesc> io(in_dyn);
    io.insert(io.end(), out_dyn.begin(), out_dyn.end());
    if (!build->supportsFormatCombination(pos, io.data(), nb_inputs, nb_outputs))
      return fail(error, error_len, "supportsFormatCombination refused position " + std::to_string(pos));
  }
  if (build->configurePlugin(in_dyn.data(), nb_inputs, out_dyn.data(), nb_outputs) != 0)
    return fail(error, error_len, "configurePlugin failed");
  const size_t workspace_bytes = build->getWorkspaceSize(in_dyn.data(), nb_inputs, out_dyn.data(), nb_outputs);

  // What an engine stores and a runtime recreates the plugin from.
  auto* built_runtime =
      static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  const PluginFieldCollection* serialized = built_runtime->getFieldsToSerialize();
  IPluginV3* plugin = creator->createPlugin(op, serialized, TensorRTPhase::kRUNTIME);
  delete built;
  if (!plugin) return fail(error, error_len, "createPlugin (runtime, from serialized fields) returned null");
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  void* workspace = nullptr;
  if (workspace_bytes > 0 && cudaMalloc(&workspace, workspace_bytes) != cudaSuccess) {
    delete plugin;
    return fail(error, error_len, "cudaMalloc of the workspace failed");
  }
  int status = runtime->onShapeChange(in_desc.data(), nb_inputs, out_desc.data(), nb_outputs);
  if (status == 0)
    status = runtime->enqueue(in_desc.data(), out_desc.data(), inputs, outputs, workspace,
                              static_cast<cudaStream_t>(stream));
  const cudaError_t sync = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  cudaFree(workspace);
  delete plugin;
  if (status != 0) return fail(error, error_len, "enqueue returned " + std::to_string(status));
  if (sync != cudaSuccess) return fail(error, error_len, std::string("stream: ") + cudaGetErrorString(sync));
  std::snprintf(error, static_cast<size_t>(error_len), "workspace %zu", workspace_bytes);
  return 0;
}
