// ONNX Runtime glue: the custom-op registration (RegisterCustomOps) and the three kernels.
//
// Built against the ONNX Runtime C API headers only (no link to libonnxruntime): every API call
// goes through the OrtApi table obtained from the OrtApiBase that ONNX Runtime passes in.
// No C++ exception crosses the library boundary: each entry point catches everything and returns
// an OrtStatus whose message names the op, the input or attribute and the bad value.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "common.h"
#include "contract.h"
#include "kernel_api.h"
#include "onnxruntime_c_api.h"
#include "ops.h"

#define DHSA_EXPORT extern "C" __attribute__((visibility("default")))

#ifndef DHSA_ORT_CPU_VERSION
#define DHSA_ORT_CPU_VERSION "0.1.0"
#endif

namespace dhsa {
namespace {

// The ORT API version this library is written against (headers of ONNX Runtime 1.21).
constexpr uint32_t kRequestedApi = 21;
static_assert(ORT_API_VERSION >= kRequestedApi, "headers older than the requested ORT API");

OrtStatus* make_status(const OrtApi* api, OrtErrorCode code, const std::string& message) {
  return api->CreateStatus(code, message.c_str());
}

// Runs body(), turning any exception into an OrtStatus (nullptr on success).
template <typename Body>
OrtStatus* guarded(const OrtApi* api, const char* where, Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Error& e) {
    return make_status(api, e.code(), e.what());
  } catch (const std::bad_alloc&) {
    return make_status(api, ORT_FAIL, cat(where, ": out of memory"));
  } catch (const std::exception& e) {
    return make_status(api, ORT_FAIL, cat(where, ": ", e.what()));
  } catch (...) {
    return make_status(api, ORT_FAIL, cat(where, ": unknown error"));
  }
}

void check(const OrtApi* api, OrtStatus* status, const std::string& what) {
  if (status == nullptr) return;
  const std::string message = api->GetErrorMessage(status);
  const OrtErrorCode code = api->GetErrorCode(status);
  api->ReleaseStatus(status);
  throw Error(cat(what, ": ", message), code);
}

// ----------------------------------------------------------------------------------- attributes

bool attribute_present_as(const OrtApi* api, const OrtKernelInfo* info, const char* name, AttrKind kind) {
  OrtStatus* status = nullptr;
  if (kind == AttrKind::kInt) {
    int64_t v;
    status = api->KernelInfoGetAttribute_int64(info, name, &v);
  } else if (kind == AttrKind::kFloat) {
    float v;
    status = api->KernelInfoGetAttribute_float(info, name, &v);
  } else {
    size_t size = 0;
    status = api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  }
  if (status == nullptr) return true;
  api->ReleaseStatus(status);
  return false;
}

// An attribute of the wrong ONNX type is an error; a missing one takes the contract default.
[[noreturn]] void wrong_type(const OpSpec& op, const AttrSpec& spec) {
  throw Error(cat(op.name, ": attribute ", spec.name, " must be of type ", kind_name(spec.kind),
                  " (see dhsa_export.onnx.registry)"));
}

void check_other_types(const OrtApi* api, const OrtKernelInfo* info, const OpSpec& op, const AttrSpec& spec) {
  for (AttrKind other : {AttrKind::kInt, AttrKind::kFloat, AttrKind::kString})
    if (other != spec.kind && attribute_present_as(api, info, spec.name, other)) wrong_type(op, spec);
}

int64_t read_int(const OrtApi* api, const OrtKernelInfo* info, const OpSpec& op, const char* name) {
  const AttrSpec& spec = op.attribute(name);
  int64_t value = 0;
  OrtStatus* status = api->KernelInfoGetAttribute_int64(info, name, &value);
  if (status == nullptr) return value;
  api->ReleaseStatus(status);
  check_other_types(api, info, op, spec);
  return spec.int_default;
}

double read_float(const OrtApi* api, const OrtKernelInfo* info, const OpSpec& op, const char* name) {
  const AttrSpec& spec = op.attribute(name);
  float value = 0.f;
  OrtStatus* status = api->KernelInfoGetAttribute_float(info, name, &value);
  if (status == nullptr) return static_cast<double>(value);
  api->ReleaseStatus(status);
  check_other_types(api, info, op, spec);
  return spec.float_default;
}

std::string read_string(const OrtApi* api, const OrtKernelInfo* info, const OpSpec& op, const char* name) {
  const AttrSpec& spec = op.attribute(name);
  size_t size = 0;
  OrtStatus* status = api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status != nullptr) {
    api->ReleaseStatus(status);
    check_other_types(api, info, op, spec);
    return spec.string_default;
  }
  std::vector<char> buffer(size + 1, '\0');
  check(api, api->KernelInfoGetAttribute_string(info, name, buffer.data(), &size),
        cat(op.name, ": reading attribute ", name));
  return std::string(buffer.data());
}

// -------------------------------------------------------------------------------------- tensors

DType dtype_of(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return DType::kBFloat16;
    default: throw Error(cat("dhsa: unsupported element type ", static_cast<int>(type)));
  }
}

struct Tensor {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  void* data = nullptr;
  int64_t elements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

Tensor get_input(const OrtApi* api, OrtKernelContext* context, size_t index, const OpSpec& op) {
  Tensor t;
  const PortSpec& port = op.inputs[index];
  size_t count = 0;
  check(api, api->KernelContext_GetInputCount(context, &count), cat(op.name, ": counting inputs"));
  const OrtValue* value = nullptr;
  if (index < count) check(api, api->KernelContext_GetInput(context, index, &value), cat(op.name, ": input ", port.name));
  if (value == nullptr) {
    if (!port.optional) throw Error(cat(op.name, ": required input ", port.name, " is missing"));
    return t;
  }
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api->GetTensorTypeAndShape(value, &info), cat(op.name, ": input ", port.name));
  size_t rank = 0;
  OrtStatus* status = api->GetTensorElementType(info, &t.type);
  if (status == nullptr) status = api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    t.shape.resize(rank);
    status = api->GetDimensions(info, t.shape.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(api, status, cat(op.name, ": input ", port.name));
  check(api, api->GetTensorMutableData(const_cast<OrtValue*>(value), &t.data), cat(op.name, ": input ", port.name));
  t.present = true;
  if (static_cast<int>(rank) != port.rank)
    throw Error(cat(op.name, ": input ", port.name, " has rank ", rank, " (shape ", shape_string(t.shape), "), expected rank ",
                    port.rank));
  if (!port.is_float && t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
    throw Error(cat(op.name, ": input ", port.name, " must be int32 (element type ", static_cast<int>(t.type), ")"));
  return t;
}

void* get_output(const OrtApi* api, OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape,
                 const OpSpec& op) {
  OrtValue* value = nullptr;
  check(api, api->KernelContext_GetOutput(context, index, shape.data(), shape.size(), &value),
        cat(op.name, ": allocating output ", op.outputs[index].name, " ", shape_string(shape)));
  void* data = nullptr;
  check(api, api->GetTensorMutableData(value, &data), cat(op.name, ": output ", op.outputs[index].name));
  return data;
}

// fp32 view of a float input: the tensor itself, or a converted copy for fp16/bf16.
const float* as_float(const Tensor& t, DType type, std::vector<float>& storage) {
  if (type == DType::kFloat32) return static_cast<const float*>(t.data);
  storage.resize(static_cast<size_t>(t.elements()));
  to_float(type, t.data, storage.data(), storage.size());
  return storage.data();
}

void require_positive(const OpSpec& op, const char* what, int64_t value, const Tensor& t, const char* name) {
  if (value < 1)
    throw Error(cat(op.name, ": ", what, " = ", value, " in ", name, " ", shape_string(t.shape), " must be >= 1"));
}

const KernelTable& kernels_from_env() { return select_kernels(std::getenv("DHSA_ORT_ISA")); }

// Both ops read the same query/key dimensions and require the same of them; Problem is
// RouteProblem or AttentionProblem, which name these fields alike.
template <typename Problem>
void read_query_key_dims(const OpSpec& op, const Tensor& q, const Tensor& k, Problem& p) {
  p.batch = q.shape[0];
  p.q_heads = q.shape[1];
  p.q_len = q.shape[2];
  p.head_dim = q.shape[3];
  p.kv_heads = k.shape[1];
  p.k_len = k.shape[2];
  require_positive(op, "query heads", p.q_heads, q, "query");
  require_positive(op, "key heads", p.kv_heads, k, "key");
  require_positive(op, "head dim", p.head_dim, q, "query");
  if (k.shape[0] != p.batch || k.shape[3] != p.head_dim)
    throw Error(cat(op.name, ": key ", shape_string(k.shape), " does not match query ", shape_string(q.shape),
                    " (batch and head dim must agree)"));
}

// The optional key_chunk_offsets input: only its batch is checked here; its contents are validated
// by the op itself before any index is used.
template <typename Problem>
void read_chunk_offsets(const OpSpec& op, const Tensor& offsets, Problem& p) {
  if (!offsets.present) return;
  if (offsets.shape[0] != p.batch)
    throw Error(cat(op.name, ": key_chunk_offsets ", shape_string(offsets.shape), " must have batch ", p.batch));
  p.chunk_offsets = static_cast<const int32_t*>(offsets.data);
  p.offsets_width = offsets.shape[1];
}

// -------------------------------------------------------------------------------------- kernels

struct RouteKernel {
  const OrtApi* api;
  RouteAttrs attrs;
  DType dtype;
  const KernelTable* kernels;

  void compute(OrtKernelContext* context) const {
    const OpSpec& op = route_spec();
    const Tensor q = get_input(api, context, 0, op), k = get_input(api, context, 1, op);
    const Tensor offsets = get_input(api, context, 2, op);
    if (q.type != k.type)
      throw Error(cat(op.name, ": query and key must have the same element type (", static_cast<int>(q.type), " vs ",
                      static_cast<int>(k.type), ")"));
    RouteProblem p;
    read_query_key_dims(op, q, k, p);
    read_chunk_offsets(op, offsets, p);
    const RouteShape shape = route_shape(attrs, p);
    std::vector<float> q_store, k_store;
    p.query = as_float(q, dtype, q_store);
    p.key = as_float(k, dtype, k_store);
    auto* index = static_cast<int32_t*>(
        get_output(api, context, 0, {p.batch, shape.routing_heads, shape.q_blocks, shape.chunks}, op));
    auto* count = static_cast<int32_t*>(get_output(api, context, 1, {p.batch, shape.routing_heads, shape.q_blocks}, op));
    route(attrs, p, shape, index, count, Parallel(api, context), *kernels);
  }
};

struct ChunkOffsetsKernel {
  const OrtApi* api;
  ChunkOffsetsAttrs attrs;
  DType dtype;
  const KernelTable* kernels;  // unused: the rules are scalar code

  void compute(OrtKernelContext* context) const {
    const OpSpec& op = chunk_offsets_spec();
    const Tensor key = get_input(api, context, 0, op), probs = get_input(api, context, 1, op);
    ChunkOffsetsProblem p;
    p.batch = key.shape[0];
    p.kv_heads = key.shape[1];
    p.length = key.shape[2];
    p.head_dim = key.shape[3];
    require_positive(op, "key heads", p.kv_heads, key, "key");
    require_positive(op, "head dim", p.head_dim, key, "key");
    if (p.length > static_cast<int64_t>(std::numeric_limits<int32_t>::max()))
      throw Error(cat(op.name, ": key length ", p.length, " does not fit the int32 offsets"));
    if (probs.present && (probs.shape[0] != p.batch || probs.shape[1] != p.length))
      throw Error(cat(op.name, ": boundary_probs ", shape_string(probs.shape), " must be [batch, key length] = ",
                      shape_string(std::vector<int64_t>{p.batch, p.length}), " for key ", shape_string(key.shape)));
    std::vector<float> key_store, probs_store;
    if (!probs.present) p.key = as_float(key, dtype, key_store);  // the predictor reads only the probabilities
    if (probs.present) p.probs = as_float(probs, dtype, probs_store);
    const std::vector<std::vector<int64_t>> rows = chunk_offsets(attrs, p, Parallel(api, context));
    size_t width = 1;
    for (const auto& row : rows) width = std::max(width, row.size());
    auto* out = static_cast<int32_t*>(get_output(api, context, 0, {p.batch, static_cast<int64_t>(width)}, op));
    for (int64_t b = 0; b < p.batch; ++b) {  // rows padded with L: empty trailing chunks
      const auto& row = rows[b];
      for (size_t c = 0; c < width; ++c) out[b * width + c] = static_cast<int32_t>(c < row.size() ? row[c] : p.length);
    }
  }
};

struct AttentionKernel {
  const OrtApi* api;
  AttentionAttrs attrs;
  DType dtype;
  const KernelTable* kernels;

  void compute(OrtKernelContext* context) const {
    const OpSpec& op = attention_spec();
    const Tensor q = get_input(api, context, 0, op), k = get_input(api, context, 1, op), v = get_input(api, context, 2, op);
    const Tensor index = get_input(api, context, 3, op), count = get_input(api, context, 4, op);
    const Tensor offsets = get_input(api, context, 5, op);
    if (q.type != k.type || q.type != v.type)
      throw Error(cat(op.name, ": query, key and value must have the same element type"));
    AttentionProblem p;
    read_query_key_dims(op, q, k, p);
    p.value_dim = v.shape[3];
    if (v.shape[0] != p.batch || v.shape[1] != p.kv_heads || v.shape[2] != p.k_len)
      throw Error(cat(op.name, ": value ", shape_string(v.shape), " does not match key ", shape_string(k.shape),
                      " (batch, heads and length must agree)"));
    if (p.q_heads % p.kv_heads != 0)
      throw Error(cat(op.name, ": query heads ", p.q_heads, " are not a multiple of key heads ", p.kv_heads));
    p.routing_heads = index.shape[1];
    p.q_blocks = index.shape[2];
    p.width = index.shape[3];
    if (index.shape[0] != p.batch)
      throw Error(cat(op.name, ": block_index ", shape_string(index.shape), " must have batch ", p.batch));
    require_positive(op, "routing heads", p.routing_heads, index, "block_index");
    if (p.q_heads % p.routing_heads != 0)
      throw Error(cat(op.name, ": query heads ", p.q_heads, " are not a multiple of the routing heads ",
                      p.routing_heads, " of block_index ", shape_string(index.shape)));
    const int64_t expected_blocks = (p.q_len + attrs.q_block - 1) / attrs.q_block;
    if (p.q_blocks != expected_blocks)
      throw Error(cat(op.name, ": block_index ", shape_string(index.shape), " has ", p.q_blocks,
                      " query blocks, expected ceil(Lq / q_block) = ceil(", p.q_len, " / ", attrs.q_block, ") = ",
                      expected_blocks));
    if (count.shape[0] != p.batch || count.shape[1] != p.routing_heads || count.shape[2] != p.q_blocks)
      throw Error(cat(op.name, ": block_count ", shape_string(count.shape), " must be ",
                      shape_string(std::vector<int64_t>{p.batch, p.routing_heads, p.q_blocks})));
    read_chunk_offsets(op, offsets, p);
    p.block_index = static_cast<const int32_t*>(index.data);
    p.block_count = static_cast<const int32_t*>(count.data);
    std::vector<float> q_store, k_store, v_store, out_store;
    p.query = as_float(q, dtype, q_store);
    p.key = as_float(k, dtype, k_store);
    p.value = as_float(v, dtype, v_store);
    const std::vector<int64_t> out_shape = {p.batch, p.q_heads, p.q_len, p.value_dim};
    void* out = get_output(api, context, 0, out_shape, op);
    float* out_f32 = static_cast<float*>(out);
    if (dtype != DType::kFloat32) {
      out_store.resize(static_cast<size_t>(p.batch * p.q_heads * p.q_len * p.value_dim));
      out_f32 = out_store.data();
    }
    block_sparse_attention(attrs, p, out_f32, Parallel(api, context), *kernels);
    if (dtype != DType::kFloat32) from_float(dtype, out_store.data(), out, out_store.size());
  }
};

// ------------------------------------------------------------------------------- OrtCustomOp glue

struct Op : OrtCustomOp {
  const OpSpec* spec;
  ONNXTensorElementDataType float_type;
};

const Op& as_op(const OrtCustomOp* op) { return *static_cast<const Op*>(op); }

ONNXTensorElementDataType port_type(const Op& op, const PortSpec& port) {
  return port.is_float ? op.float_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
}

template <typename Kernel>
OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* context) {
  const Kernel* k = static_cast<const Kernel*>(kernel);
  return guarded(k->api, "dhsa", [&] { k->compute(context); });
}

template <typename Kernel>
void ORT_API_CALL destroy(void* kernel) {
  delete static_cast<Kernel*>(kernel);
}

// Reads a node's attributes with `read`, validates them and creates the kernel; any problem becomes
// a status naming the op and the attribute.
template <typename Kernel, typename Read>
OrtStatus* create_kernel(const OrtCustomOp* custom_op, const OrtApi* api, void** kernel, Read&& read) {
  *kernel = nullptr;
  const Op& op = as_op(custom_op);
  return guarded(api, op.spec->name, [&] {
    const auto attrs = read(*op.spec);
    attrs.validate();
    *kernel = new Kernel{api, attrs, dtype_of(op.float_type), &kernels_from_env()};
  });
}

OrtStatus* ORT_API_CALL create_route(const OrtCustomOp* custom_op, const OrtApi* api, const OrtKernelInfo* info,
                                      void** kernel) {
  return create_kernel<RouteKernel>(custom_op, api, kernel, [&](const OpSpec& spec) {
    RouteAttrs a;
    a.q_block = read_int(api, info, spec, "q_block");
    a.k_block = read_int(api, info, spec, "k_block");
    a.pattern = read_string(api, info, spec, "pattern");
    a.density = read_float(api, info, spec, "density");
    a.head_group = read_int(api, info, spec, "head_group");
    a.sink_tokens = read_int(api, info, spec, "sink_tokens");
    a.local_tokens = read_int(api, info, spec, "local_tokens");
    a.instruction_tokens = read_int(api, info, spec, "instruction_tokens");
    a.vslash_blockwise_above = read_int(api, info, spec, "vslash_blockwise_above");
    a.chunk_score = read_string(api, info, spec, "chunk_score");
    return a;
  });
}

OrtStatus* ORT_API_CALL create_attention(const OrtCustomOp* custom_op, const OrtApi* api, const OrtKernelInfo* info,
                                          void** kernel) {
  return create_kernel<AttentionKernel>(custom_op, api, kernel, [&](const OpSpec& spec) {
    AttentionAttrs a;
    a.q_block = read_int(api, info, spec, "q_block");
    a.k_block = read_int(api, info, spec, "k_block");
    a.scale = read_float(api, info, spec, "scale");
    a.causal = read_int(api, info, spec, "causal");
    return a;
  });
}

OrtStatus* ORT_API_CALL create_chunk_offsets(const OrtCustomOp* custom_op, const OrtApi* api,
                                              const OrtKernelInfo* info, void** kernel) {
  return create_kernel<ChunkOffsetsKernel>(custom_op, api, kernel, [&](const OpSpec& spec) {
    ChunkOffsetsAttrs a;
    a.min_chunk = read_int(api, info, spec, "min_chunk");
    a.max_chunk = read_int(api, info, spec, "max_chunk");
    a.window = read_int(api, info, spec, "window");
    a.threshold = read_float(api, info, spec, "threshold");
    return a;
  });
}

template <typename Kernel>
void set_kernel(Op& op, OrtStatus*(ORT_API_CALL* create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*,
                                                            void**)) {
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute<Kernel>;
  op.KernelDestroy = destroy<Kernel>;
}

Op make_op(const OpSpec* spec, ONNXTensorElementDataType float_type) {
  Op op;
  std::memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));
  op.version = kRequestedApi;
  op.spec = spec;
  op.float_type = float_type;
  op.GetName = [](const OrtCustomOp* o) { return as_op(o).spec->name; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return as_op(o).spec->inputs.size(); };
  op.GetInputType = [](const OrtCustomOp* o, size_t i) { return port_type(as_op(o), as_op(o).spec->inputs[i]); };
  op.GetOutputTypeCount = [](const OrtCustomOp* o) { return as_op(o).spec->outputs.size(); };
  op.GetOutputType = [](const OrtCustomOp* o, size_t i) { return port_type(as_op(o), as_op(o).spec->outputs[i]); };
  op.GetInputCharacteristic = [](const OrtCustomOp* o, size_t i) {
    return as_op(o).spec->inputs[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetStartVersion = [](const OrtCustomOp*) { return kOpsetVersion; };
  op.GetEndVersion = [](const OrtCustomOp*) { return kOpsetVersion; };
  if (spec == &route_spec())
    set_kernel<RouteKernel>(op, create_route);
  else if (spec == &attention_spec())
    set_kernel<AttentionKernel>(op, create_attention);
  else
    set_kernel<ChunkOffsetsKernel>(op, create_chunk_offsets);
  return op;
}

// One OrtCustomOp per (op, float type): ONNX Runtime groups same-named ops into one schema whose
// float inputs accept float32, float16 and bfloat16, and picks the kernel by the node's types.
const std::vector<Op>& custom_ops() {
  static const std::vector<Op> ops = [] {
    std::vector<Op> out;
    for (ONNXTensorElementDataType type : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                           ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16}) {
      for (const OpSpec* spec : all_specs()) out.push_back(make_op(spec, type));
    }
    return out;
  }();
  return ops;
}

}  // namespace
}  // namespace dhsa

// ------------------------------------------------------------------------------- exported symbols

DHSA_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // cannot happen with ONNX Runtime; no API to report through
  const OrtApi* api = api_base->GetApi(dhsa::kRequestedApi);
  if (api == nullptr) {
    // ONNX Runtime older than the requested API: report through API version 1, which every ORT serves.
    const OrtApi* v1 = api_base->GetApi(1);
    const char* version = api_base->GetVersionString ? api_base->GetVersionString() : "unknown";
    const std::string message = std::string("dhsa ORT CPU library needs ONNX Runtime API version ") +
                                std::to_string(dhsa::kRequestedApi) + " (ONNX Runtime >= 1.21); this ONNX Runtime is " +
                                version;
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  OrtCustomOpDomain* domain = nullptr;
  OrtStatus* status = dhsa::guarded(api, "RegisterCustomOps", [&] {
    dhsa::check(api, api->CreateCustomOpDomain(dhsa::kDomain, &domain), "RegisterCustomOps: creating domain dhsa");
    for (const dhsa::Op& op : dhsa::custom_ops())
      dhsa::check(api, api->CustomOpDomain_Add(domain, &op), dhsa::cat("RegisterCustomOps: adding ", op.spec->name));
    dhsa::check(api, api->AddCustomOpDomain(options, domain), "RegisterCustomOps: adding domain dhsa");
  });
  if (status != nullptr && domain != nullptr) api->ReleaseCustomOpDomain(domain);
  // On success the domain stays alive for the process: sessions built from these options refer to
  // it, and releasing it at library unload could run after ONNX Runtime itself is gone.
  return status;
}

// The contract this library registers (domain, version, ops with inputs/outputs/attributes and
// defaults) as JSON, in the layout of dhsa_export.onnx.registry.contract_json().
DHSA_EXPORT const char* dhsa_ort_contract_json(void) {
  try {
    return dhsa::contract_json().c_str();
  } catch (...) {
    return "";
  }
}

// The kernel instruction set a session created now would use (honours DHSA_ORT_ISA).
DHSA_EXPORT const char* dhsa_ort_kernel_isa(void) { return dhsa::kernels_from_env().name; }

DHSA_EXPORT const char* dhsa_ort_version(void) { return DHSA_ORT_CPU_VERSION; }
