// The op contract as the native libraries implement it: names, ports, attributes and defaults.
//
// Shared by the ONNX Runtime CPU library (plugins/ort_cpu: registration, attribute defaults,
// dhsa_ort_contract_json()) and the TensorRT plugin (plugins/trt/plugin: plugin fields, their
// defaults, dhsa_trt_plugin_contract_json()). Tests compare both libraries' JSON with
// dhsa_export.onnx.registry.contract_json(), so neither can drift from the registry. Plain C++17,
// no runtime headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dhsa {

constexpr const char* kDomain = "dhsa";
constexpr int kOpsetVersion = 1;

enum class AttrKind { kInt, kFloat, kString };

// The registry's name of an attribute kind: "int", "float" or "string".
const char* kind_name(AttrKind kind);

struct AttrSpec {
  const char* name;
  AttrKind kind;
  int64_t int_default;
  double float_default;
  const char* string_default;
};

struct PortSpec {
  const char* name;
  bool is_float;  // float32 | float16 | bfloat16 (one type per node); otherwise int32
  int rank;
  bool optional;
};

struct OpSpec {
  const char* name;
  std::vector<PortSpec> inputs;
  std::vector<PortSpec> outputs;
  std::vector<AttrSpec> attributes;

  const AttrSpec& attribute(const char* attr_name) const;
};

const OpSpec& route_spec();
const OpSpec& attention_spec();
const OpSpec& chunk_offsets_spec();
const std::vector<const OpSpec*>& all_specs();

// {"domain", "version", "ops": [{"name", "inputs", "outputs", "attributes"}]} like the registry.
const std::string& contract_json();

}  // namespace dhsa
