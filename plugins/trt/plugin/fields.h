// Plugin fields <-> op attributes, read from the shared op contract (plugins/common/contract.h).
//
// The ONNX parser turns a node's attributes into PluginFields (ints as kINT32 or kINT64, floats as
// kFLOAT32, strings as kCHAR); an engine's serialized plugin comes back with the fields
// getFieldsToSerialize wrote (ints kINT32, floats kFLOAT64 so a density survives exactly). Values
// are parsed against the contract: a missing attribute takes its contract default, a field of the
// wrong kind or length is an error that names it.
#pragma once

#include <NvInfer.h>
#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "contract.h"

namespace dhsa {
namespace trt {

// One attribute's value (the member of its AttrKind is the one used).
struct AttrValue {
  int64_t i = 0;
  double f = 0.0;
  std::string s;
};

// An op's attribute values, in contract order, with their serialized PluginField view.
class Attributes {
 public:
  explicit Attributes(const OpSpec& spec);

  // Parse `fields` over the contract defaults. On failure returns false and sets *error to one
  // line naming the field, the value and the fix. Fields the contract does not name (the parser's
  // plugin_version / plugin_namespace) are skipped.
  bool parse(const nvinfer1::PluginFieldCollection* fields, std::string* error);

  int64_t integer(const char* name) const;
  double real(const char* name) const;
  const std::string& text(const char* name) const;

  // The fields to serialize (pointers into this object: valid until it changes or dies).
  const nvinfer1::PluginFieldCollection* serialized();

  const OpSpec& spec() const { return *spec_; }

 private:
  size_t index_of(const char* name) const;

  const OpSpec* spec_;
  std::vector<AttrValue> values_;
  std::vector<int32_t> ints_;  // serialization storage (ints as int32)
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
};

// The creator's field names: every contract attribute with the type the parser gives it.
class FieldNames {
 public:
  explicit FieldNames(const OpSpec& spec);
  const nvinfer1::PluginFieldCollection* collection() const { return &collection_; }

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
};

}  // namespace trt
}  // namespace dhsa
