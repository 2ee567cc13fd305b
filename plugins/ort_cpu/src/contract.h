// The op contract as this library implements it: names, ports, attributes and defaults.
//
// Registration (ops.cpp), attribute defaults and the JSON returned by dhsa_ort_contract_json()
// all read this one table, and a test compares that JSON with
// dhsa_export.onnx.registry.contract_json(), so the library and the registry cannot drift apart.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dhsa {

constexpr const char* kDomain = "dhsa";
constexpr int kOpsetVersion = 1;

enum class AttrKind { kInt, kFloat, kString };

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
