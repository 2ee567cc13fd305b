// The plugin library's one registration file: the entry points TensorRT's plugin registry looks
// for when it loads this library (IPluginRegistry::loadLibrary, `trtexec --dynamicPlugins`,
// `polygraphy --plugins`), and the contract the library implements, for tests.
#include <NvInfer.h>
#include <NvInferRuntime.h>

#include <cstdio>
#include <mutex>

#include "dhsa_kernels.h"
#include "dhsa_plugins.h"

#if defined(__GNUC__)
#define DHSA_TRT_API extern "C" __attribute__((visibility("default")))
#else
#define DHSA_TRT_API extern "C"
#endif

namespace dhsa {
namespace trt {
namespace {

std::mutex g_logger_mutex;
nvinfer1::ILoggerFinder* g_logger_finder = nullptr;

}  // namespace

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept {
  std::lock_guard<std::mutex> lock(g_logger_mutex);
  g_logger_finder = finder;
}

void log_error(const std::string& message) noexcept {
  {
    std::lock_guard<std::mutex> lock(g_logger_mutex);
    nvinfer1::ILogger* logger = g_logger_finder ? g_logger_finder->findLogger() : nullptr;
    if (logger) {
      logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
      return;
    }
  }
  std::fprintf(stderr, "[dhsa trt plugin] %s\n", message.c_str());
}

// One creator per op, alive as long as the library is loaded.
nvinfer1::IPluginCreatorInterface* const* creators(int32_t* count) noexcept {
  static DhsaPluginCreator<RoutePlugin> route(route_spec());
  static DhsaPluginCreator<BlockSparseAttentionPlugin> attention(attention_spec());
  static DhsaPluginCreator<ChunkOffsetsPlugin> chunk_offsets(chunk_offsets_spec());
  static nvinfer1::IPluginCreatorInterface* const list[] = {&route, &attention, &chunk_offsets};
  *count = static_cast<int32_t>(sizeof(list) / sizeof(list[0]));
  return list;
}

}  // namespace trt
}  // namespace dhsa

// TensorRT hands its logger finder over when it loads the library.
DHSA_TRT_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { dhsa::trt::set_logger_finder(finder); }

// The IPluginV3 creators of this library (Route, BlockSparseAttention, ChunkOffsets).
DHSA_TRT_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  return dhsa::trt::creators(&nbCreators);
}

// The op contract this library implements, in the layout of dhsa_export.onnx.registry.contract_json()
// (the plugin fields and their defaults are read from the same table).
DHSA_TRT_API const char* dhsa_trt_plugin_contract_json(void) { return dhsa::contract_json().c_str(); }

// Names of the plugins, one per line, as the creators report them (name, version, namespace and
// field names with their types): what a test compares with the registry without TensorRT.
DHSA_TRT_API const char* dhsa_trt_plugin_creators(void) {
  static const std::string text = [] {
    std::string out;
    int32_t count = 0;
    auto* const* list = dhsa::trt::creators(&count);
    for (int32_t i = 0; i < count; ++i) {
      auto* creator = static_cast<nvinfer1::IPluginCreatorV3One*>(list[i]);
      out += std::string(creator->getPluginNamespace()) + "::" + creator->getPluginName() + " " +
             creator->getPluginVersion();
      const nvinfer1::PluginFieldCollection* fields = creator->getFieldNames();
      for (int32_t f = 0; f < fields->nbFields; ++f)
        out += " " + std::string(fields->fields[f].name) + ":" +
               std::to_string(static_cast<int>(fields->fields[f].type));
      out += "\n";
    }
    return out;
  }();
  return text.c_str();
}

// ABI version of the kernels this plugin was built with (DHSA_ABI_VERSION).
DHSA_TRT_API int dhsa_trt_plugin_kernel_abi(void) { return DHSA_ABI_VERSION; }
