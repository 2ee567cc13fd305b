#include "fields.h"

#include <cmath>
#include <cstring>

namespace dhsa {
namespace trt {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

namespace {

// A numeric field's first element as double; false for non-numeric types.
bool read_number(const PluginField& field, double* out) {
  switch (field.type) {
    case PluginFieldType::kINT8: *out = static_cast<const int8_t*>(field.data)[0]; return true;
    case PluginFieldType::kINT16: *out = static_cast<const int16_t*>(field.data)[0]; return true;
    case PluginFieldType::kINT32: *out = static_cast<const int32_t*>(field.data)[0]; return true;
    case PluginFieldType::kINT64:
      *out = static_cast<double>(static_cast<const int64_t*>(field.data)[0]);
      return true;
    case PluginFieldType::kFLOAT32: *out = static_cast<const float*>(field.data)[0]; return true;
    case PluginFieldType::kFLOAT64: *out = static_cast<const double*>(field.data)[0]; return true;
    default: return false;
  }
}

bool is_integer_type(PluginFieldType type) {
  return type == PluginFieldType::kINT8 || type == PluginFieldType::kINT16 ||
         type == PluginFieldType::kINT32 || type == PluginFieldType::kINT64;
}

std::string field_error(const OpSpec& spec, const AttrSpec& attr, const std::string& what) {
  return std::string("dhsa::") + spec.name + ": plugin field '" + attr.name + "' (" + kind_name(attr.kind) +
         ") " + what;
}

}  // namespace

Attributes::Attributes(const OpSpec& spec) : spec_(&spec), values_(spec.attributes.size()) {
  for (size_t i = 0; i < spec.attributes.size(); ++i) {
    const AttrSpec& attr = spec.attributes[i];
    values_[i].i = attr.int_default;
    values_[i].f = attr.float_default;
    if (attr.string_default) values_[i].s = attr.string_default;
  }
}

size_t Attributes::index_of(const char* name) const {
  for (size_t i = 0; i < spec_->attributes.size(); ++i)
    if (std::strcmp(spec_->attributes[i].name, name) == 0) return i;
  return spec_->attributes.size();
}

bool Attributes::parse(const PluginFieldCollection* fields, std::string* error) {
  if (fields == nullptr) return true;
  if (fields->nbFields > 0 && fields->fields == nullptr) {
    *error = std::string("dhsa::") + spec_->name + ": plugin field collection has " +
             std::to_string(fields->nbFields) + " fields but no field array";
    return false;
  }
  for (int32_t n = 0; n < fields->nbFields; ++n) {
    const PluginField& field = fields->fields[n];
    if (field.name == nullptr) continue;
    const size_t i = index_of(field.name);
    if (i == spec_->attributes.size()) continue;  // plugin_version, plugin_namespace, ...
    const AttrSpec& attr = spec_->attributes[i];
    if (field.data == nullptr || field.length < 1) {
      *error = field_error(*spec_, attr, "has no value; drop it or give one value");
      return false;
    }
    if (attr.kind == AttrKind::kString) {
      if (field.type != PluginFieldType::kCHAR) {
        *error = field_error(*spec_, attr, "must be a string (kCHAR), got field type " +
                                                std::to_string(static_cast<int>(field.type)));
        return false;
      }
      std::string text(static_cast<const char*>(field.data), static_cast<size_t>(field.length));
      while (!text.empty() && text.back() == '\0') text.pop_back();
      values_[i].s = text;
      continue;
    }
    double number = 0.0;
    if (field.length != 1 || !read_number(field, &number)) {
      *error = field_error(*spec_, attr, "must be one number, got field type " +
                                              std::to_string(static_cast<int>(field.type)) + " of length " +
                                              std::to_string(field.length));
      return false;
    }
    if (attr.kind == AttrKind::kInt) {
      if (!is_integer_type(field.type) && (std::floor(number) != number || !std::isfinite(number))) {
        *error = field_error(*spec_, attr, "= " + std::to_string(number) + " is not an integer");
        return false;
      }
      if (std::fabs(number) > 2147483647.0) {
        *error = field_error(*spec_, attr, "= " + std::to_string(number) + " does not fit in int32");
        return false;
      }
      values_[i].i = static_cast<int64_t>(number);
    } else {
      values_[i].f = number;
    }
  }
  return true;
}

int64_t Attributes::integer(const char* name) const { return values_[index_of(name)].i; }
double Attributes::real(const char* name) const { return values_[index_of(name)].f; }
const std::string& Attributes::text(const char* name) const { return values_[index_of(name)].s; }

const PluginFieldCollection* Attributes::serialized() {
  const size_t n = spec_->attributes.size();
  ints_.assign(n, 0);
  fields_.clear();
  fields_.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const AttrSpec& attr = spec_->attributes[i];
    switch (attr.kind) {
      case AttrKind::kInt:
        ints_[i] = static_cast<int32_t>(values_[i].i);
        fields_.emplace_back(attr.name, &ints_[i], PluginFieldType::kINT32, 1);
        break;
      case AttrKind::kFloat:
        fields_.emplace_back(attr.name, &values_[i].f, PluginFieldType::kFLOAT64, 1);
        break;
      case AttrKind::kString:
        fields_.emplace_back(attr.name, values_[i].s.c_str(), PluginFieldType::kCHAR,
                             static_cast<int32_t>(values_[i].s.size()));
        break;
    }
  }
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
  return &collection_;
}

FieldNames::FieldNames(const OpSpec& spec) {
  for (const AttrSpec& attr : spec.attributes) {
    const PluginFieldType type = attr.kind == AttrKind::kInt     ? PluginFieldType::kINT32
                                 : attr.kind == AttrKind::kFloat ? PluginFieldType::kFLOAT32
                                                                 : PluginFieldType::kCHAR;
    fields_.emplace_back(attr.name, nullptr, type, 1);
  }
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
}

}  // namespace trt
}  // namespace dhsa
