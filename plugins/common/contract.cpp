#include "contract.h"

#include <cstdio>
#include <stdexcept>

namespace dhsa {

const char* kind_name(AttrKind kind) {
  switch (kind) {
    case AttrKind::kInt: return "int";
    case AttrKind::kFloat: return "float";
    case AttrKind::kString: return "string";
  }
  return "?";
}

const AttrSpec& OpSpec::attribute(const char* attr_name) const {
  for (const auto& a : attributes)
    if (std::string(a.name) == attr_name) return a;
  throw std::logic_error(std::string("dhsa: ") + name + " has no attribute " + attr_name);
}

namespace {

// Defaults follow DHSAConfig (DESIGN.md section 2), exactly as dhsa_export.onnx.registry states them.
OpSpec make_route() {
  return OpSpec{
      "Route",
      {{"query", true, 4, false}, {"key", true, 4, false}, {"key_chunk_offsets", false, 2, true}},
      {{"block_index", false, 4, false}, {"block_count", false, 3, false}},
      {
          {"q_block", AttrKind::kInt, 128, 0.0, nullptr},
          {"k_block", AttrKind::kInt, 32, 0.0, nullptr},
          {"pattern", AttrKind::kString, 0, 0.0, "vslash"},
          {"density", AttrKind::kFloat, 0, 0.125, nullptr},
          {"head_group", AttrKind::kInt, 1, 0.0, nullptr},
          {"sink_tokens", AttrKind::kInt, 32, 0.0, nullptr},
          {"local_tokens", AttrKind::kInt, 128, 0.0, nullptr},
          {"instruction_tokens", AttrKind::kInt, 128, 0.0, nullptr},
          {"vslash_blockwise_above", AttrKind::kInt, 65536, 0.0, nullptr},
          {"chunk_score", AttrKind::kString, 0, 0.0, "mass"},
      }};
}

OpSpec make_chunk_offsets() {
  return OpSpec{
      "ChunkOffsets",
      {{"key", true, 4, false}, {"boundary_probs", true, 2, true}},
      {{"key_chunk_offsets", false, 2, false}},
      {
          {"min_chunk", AttrKind::kInt, 8, 0.0, nullptr},
          {"max_chunk", AttrKind::kInt, 32, 0.0, nullptr},
          {"window", AttrKind::kInt, 4, 0.0, nullptr},
          {"threshold", AttrKind::kFloat, 0, 0.5, nullptr},
      }};
}

OpSpec make_attention() {
  return OpSpec{
      "BlockSparseAttention",
      {{"query", true, 4, false},
       {"key", true, 4, false},
       {"value", true, 4, false},
       {"block_index", false, 4, false},
       {"block_count", false, 3, false},
       {"key_chunk_offsets", false, 2, true}},
      {{"output", true, 4, false}},
      {
          {"q_block", AttrKind::kInt, 128, 0.0, nullptr},
          {"k_block", AttrKind::kInt, 32, 0.0, nullptr},
          {"scale", AttrKind::kFloat, 0, 0.0, nullptr},
          {"causal", AttrKind::kInt, 1, 0.0, nullptr},
      }};
}

std::string quoted(const char* s) { return std::string("\"") + s + "\""; }

std::string port_json(const PortSpec& p, bool with_optional) {
  std::string out = "{\"name\": " + quoted(p.name) + ", \"dtypes\": ";
  out += p.is_float ? "[\"float32\", \"float16\", \"bfloat16\"]" : "[\"int32\"]";
  out += ", \"rank\": " + std::to_string(p.rank);
  if (with_optional) out += std::string(", \"optional\": ") + (p.optional ? "true" : "false");
  return out + "}";
}

std::string attr_json(const AttrSpec& a) {
  std::string out = "{\"name\": " + quoted(a.name) + ", \"type\": " + quoted(kind_name(a.kind)) + ", \"default\": ";
  switch (a.kind) {
    case AttrKind::kInt:
      out += std::to_string(a.int_default);
      break;
    case AttrKind::kFloat: {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%.17g", a.float_default);
      out += buf;
      break;
    }
    case AttrKind::kString:
      out += quoted(a.string_default);
      break;
  }
  return out + "}";
}

std::string build_json() {
  std::string out = "{\"domain\": " + quoted(kDomain) + ", \"version\": " + std::to_string(kOpsetVersion);
  out += ", \"ops\": [";
  bool first_op = true;
  for (const OpSpec* op : all_specs()) {
    if (!first_op) out += ", ";
    first_op = false;
    out += "{\"name\": " + quoted(op->name) + ", \"inputs\": [";
    for (size_t i = 0; i < op->inputs.size(); ++i) out += (i ? ", " : "") + port_json(op->inputs[i], true);
    out += "], \"outputs\": [";
    for (size_t i = 0; i < op->outputs.size(); ++i) out += (i ? ", " : "") + port_json(op->outputs[i], false);
    out += "], \"attributes\": [";
    for (size_t i = 0; i < op->attributes.size(); ++i) out += (i ? ", " : "") + attr_json(op->attributes[i]);
    out += "]}";
  }
  return out + "]}";
}

}  // namespace

const OpSpec& route_spec() {
  static const OpSpec spec = make_route();
  return spec;
}

const OpSpec& attention_spec() {
  static const OpSpec spec = make_attention();
  return spec;
}

const OpSpec& chunk_offsets_spec() {
  static const OpSpec spec = make_chunk_offsets();
  return spec;
}

const std::vector<const OpSpec*>& all_specs() {
  static const std::vector<const OpSpec*> specs = {&route_spec(), &attention_spec(), &chunk_offsets_spec()};
  return specs;
}

const std::string& contract_json() {
  static const std::string json = build_json();
  return json;
}

}  // namespace dhsa
