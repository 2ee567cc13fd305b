#include "op_calls.h"

#include <cmath>

namespace dhsa {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::Dims;

namespace {

// Route's string attributes, in the order of the C ABI enums (dhsa_export.config.PATTERNS /
// CHUNK_SCORES).
constexpr const char* kPatterns[] = {"topk", "ashape", "vslash", "vslash_blockwise", "dynamic"};
constexpr const char* kChunkScores[] = {"mass", "mean"};

template <size_t N>
int enum_index(const char* const (&names)[N], const std::string& value) {
  for (size_t i = 0; i < N; ++i)
    if (value == names[i]) return static_cast<int>(i);
  return -1;
}

template <size_t N>
std::string joined(const char* const (&names)[N]) {
  std::string out;
  for (size_t i = 0; i < N; ++i) out += (i ? ", " : "") + std::string(names[i]);
  return out;
}

// A non-null address the kernels' shape-only functions never read: with it, "key_chunk_offsets
// given" is said at build time, before any buffer exists.
const int32_t kShapeOnly = 0;

// dims -> int32 sizes of a tensor of `rank`; false (with a message) when the rank differs or a size
// is unknown (-1) or does not fit in int32.
bool sizes_of(const Dims& dims, int rank, const char* op, const char* port, int32_t* out, std::string* error) {
  if (dims.nbDims != rank) {
    *error = std::string("dhsa::") + op + ": input '" + port + "' has rank " + std::to_string(dims.nbDims) +
             ", expected " + std::to_string(rank);
    return false;
  }
  for (int i = 0; i < rank; ++i) {
    if (dims.d[i] < 0 || dims.d[i] > 2147483647) {
      *error = std::string("dhsa::") + op + ": input '" + port + "' dimension " + std::to_string(i) + " = " +
               std::to_string(dims.d[i]) + " is unknown or too large";
      return false;
    }
    out[i] = static_cast<int32_t>(dims.d[i]);
  }
  return true;
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// ChunkOffsets' plugin workspace: [kernels' workspace | rows int32 [B, L + 1] | counts int32 [B]].
struct ChunkOffsetsLayout {
  size_t rows = 0, counts = 0, total = 0;
};

ChunkOffsetsLayout chunk_offsets_layout(const DhsaChunkOffsetsParams& p, size_t kernel_bytes) {
  ChunkOffsetsLayout w;
  w.rows = align256(kernel_bytes);
  w.counts = w.rows + align256(static_cast<size_t>(p.batch) * (p.length + 1) * sizeof(int32_t));
  w.total = w.counts + align256(static_cast<size_t>(p.batch) * sizeof(int32_t));
  return w;
}

}  // namespace

std::string kernel_error(const char* op, const char* call, int status) {
  return std::string("dhsa::") + op + " " + call + ": " + dhsa_status_string(status) + ": " +
         dhsa_last_error_message();
}

int dtype_code(DataType type) {
  switch (type) {
    case DataType::kHALF: return DHSA_DTYPE_FP16;
    case DataType::kBF16: return DHSA_DTYPE_BF16;
    case DataType::kFLOAT: return DHSA_DTYPE_FP32;
    default: return -1;
  }
}

int route_pattern(const std::string& name) { return enum_index(kPatterns, name); }
int route_chunk_score(const std::string& name) { return enum_index(kChunkScores, name); }

bool validate_route_attributes(const Attributes& attributes, std::string* error) {
  if (route_pattern(attributes.text("pattern")) < 0) {
    *error = "dhsa::Route: pattern '" + attributes.text("pattern") + "' is not one of " + joined(kPatterns);
    return false;
  }
  if (route_chunk_score(attributes.text("chunk_score")) < 0) {
    *error = "dhsa::Route: chunk_score '" + attributes.text("chunk_score") + "' is not one of " +
             joined(kChunkScores);
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------- BlockSparseAttention

bool AttentionCall::plan(const Dims* dims, int32_t nb_inputs, DataType type, const Attributes& a, Params* p,
                         std::string* error) {
  int32_t q[4], k[4], v[4], index[4], count[3], offsets[2] = {0, 0};
  if (!sizes_of(dims[0], 4, kOp, "query", q, error) || !sizes_of(dims[1], 4, kOp, "key", k, error) ||
      !sizes_of(dims[2], 4, kOp, "value", v, error) || !sizes_of(dims[3], 4, kOp, "block_index", index, error) ||
      !sizes_of(dims[4], 3, kOp, "block_count", count, error) ||
      (nb_inputs == 6 && !sizes_of(dims[5], 2, kOp, "key_chunk_offsets", offsets, error)))
    return false;
  if (v[3] != q[3] || k[3] != q[3] || v[2] != k[2]) {
    *error = "dhsa::BlockSparseAttention: query D=" + std::to_string(q[3]) + ", key D=" + std::to_string(k[3]) +
             ", value Dv=" + std::to_string(v[3]) + " (Lk " + std::to_string(k[2]) + " vs " +
             std::to_string(v[2]) + "): the kernels need D == Dv and key/value of one length";
    return false;
  }
  *p = DhsaBsaParams{};
  p->key_chunk_offsets = nb_inputs == 6 ? &kShapeOnly : nullptr;
  p->batch = q[0];
  p->num_q_heads = q[1];
  p->num_kv_heads = k[1];
  p->num_route_heads = index[1];
  p->q_len = q[2];
  p->k_len = k[2];
  p->head_dim = q[3];
  p->index_width = index[3];
  p->num_chunks = nb_inputs == 6 ? offsets[1] - 1 : 0;
  p->q_block = static_cast<int32_t>(a.integer("q_block"));
  p->k_block = static_cast<int32_t>(a.integer("k_block"));
  const double scale = a.real("scale");
  p->scale = static_cast<float>(scale != 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(q[3])));
  p->causal = a.integer("causal") != 0 ? 1 : 0;
  p->dtype = dtype_code(type);
  p->variant = DHSA_VARIANT_AUTO;
  return true;
}

int AttentionCall::run(Params& p, int32_t nb_inputs, const void* const* inputs, void* const* outputs,
                       void* workspace, size_t bytes, cudaStream_t stream) {
  p.q = inputs[0];
  p.k = inputs[1];
  p.v = inputs[2];
  p.block_index = static_cast<const int32_t*>(inputs[3]);
  p.block_count = static_cast<const int32_t*>(inputs[4]);
  p.key_chunk_offsets = nb_inputs == 6 ? static_cast<const int32_t*>(inputs[5]) : nullptr;
  p.out = outputs[0];
  return dhsa_bsa_forward(&p, workspace, bytes, stream);
}

// ------------------------------------------------------------------------------------------- Route

bool RouteCall::plan(const Dims* dims, int32_t nb_inputs, DataType type, const Attributes& a, Params* p,
                     std::string* error) {
  int32_t q[4], k[4], offsets[2] = {0, 0};
  if (!sizes_of(dims[0], 4, kOp, "query", q, error) || !sizes_of(dims[1], 4, kOp, "key", k, error) ||
      (nb_inputs == 3 && !sizes_of(dims[2], 2, kOp, "key_chunk_offsets", offsets, error)))
    return false;
  *p = DhsaRouteParams{};
  p->batch = q[0];
  p->num_q_heads = q[1];
  p->num_kv_heads = k[1];
  p->q_len = q[2];
  p->k_len = k[2];
  p->head_dim = q[3];
  p->offsets_width = nb_inputs == 3 ? offsets[1] : 0;
  p->key_chunk_offsets = nb_inputs == 3 ? &kShapeOnly : nullptr;
  p->dtype = dtype_code(type);
  p->q_block = static_cast<int32_t>(a.integer("q_block"));
  p->k_block = static_cast<int32_t>(a.integer("k_block"));
  p->pattern = route_pattern(a.text("pattern"));
  p->density = a.real("density");
  p->head_group = static_cast<int32_t>(a.integer("head_group"));
  p->sink_tokens = static_cast<int32_t>(a.integer("sink_tokens"));
  p->local_tokens = static_cast<int32_t>(a.integer("local_tokens"));
  p->instruction_tokens = static_cast<int32_t>(a.integer("instruction_tokens"));
  p->vslash_blockwise_above = static_cast<int32_t>(a.integer("vslash_blockwise_above"));
  p->chunk_score = route_chunk_score(a.text("chunk_score"));
  return true;
}

int RouteCall::run(Params& p, int32_t nb_inputs, const void* const* inputs, void* const* outputs, void* workspace,
                   size_t bytes, cudaStream_t stream) {
  p.q = inputs[0];
  p.k = inputs[1];
  p.key_chunk_offsets = nb_inputs == 3 ? static_cast<const int32_t*>(inputs[2]) : nullptr;
  p.block_index = static_cast<int32_t*>(outputs[0]);
  p.block_count = static_cast<int32_t*>(outputs[1]);
  return dhsa_route_forward(&p, workspace, bytes, stream);
}

// ------------------------------------------------------------------------------------ ChunkOffsets

bool ChunkOffsetsCall::plan(const Dims* dims, int32_t nb_inputs, DataType type, const Attributes& a, Params* p,
                            std::string* error) {
  int32_t key[4], probs[2] = {0, 0};
  if (!sizes_of(dims[0], 4, kOp, "key", key, error) ||
      (nb_inputs == 2 && !sizes_of(dims[1], 2, kOp, "boundary_probs", probs, error)))
    return false;
  if (nb_inputs == 2 && (probs[0] != key[0] || probs[1] != key[2])) {
    *error = "dhsa::ChunkOffsets: boundary_probs is [" + std::to_string(probs[0]) + ", " + std::to_string(probs[1]) +
             "], expected [B, L] = [" + std::to_string(key[0]) + ", " + std::to_string(key[2]) + "]";
    return false;
  }
  *p = DhsaChunkOffsetsParams{};
  p->batch = key[0];
  p->num_kv_heads = key[1];
  p->length = key[2];
  p->head_dim = key[3];
  p->dtype = dtype_code(type);
  p->min_chunk = static_cast<int32_t>(a.integer("min_chunk"));
  p->max_chunk = static_cast<int32_t>(a.integer("max_chunk"));
  p->window = static_cast<int32_t>(a.integer("window"));
  p->threshold = a.real("threshold");
  return true;
}

int ChunkOffsetsCall::workspace(const Params& p, size_t* bytes) {
  size_t kernel_bytes = 0;
  const int status = dhsa_chunk_offsets_workspace_size(&p, &kernel_bytes);
  if (status == DHSA_STATUS_OK) *bytes = chunk_offsets_layout(p, kernel_bytes).total;
  return status;
}

int ChunkOffsetsCall::run(Params& p, int32_t nb_inputs, const void* const* inputs, void* const* outputs,
                          void* workspace, size_t, cudaStream_t stream) {
  size_t kernel_bytes = 0;
  int status = dhsa_chunk_offsets_workspace_size(&p, &kernel_bytes);
  if (status != DHSA_STATUS_OK) return status;
  const ChunkOffsetsLayout w = chunk_offsets_layout(p, kernel_bytes);
  unsigned char* base = static_cast<unsigned char*>(workspace);
  p.key = inputs[0];
  p.boundary_probs = nb_inputs == 2 ? static_cast<const float*>(inputs[1]) : nullptr;
  p.offsets = reinterpret_cast<int32_t*>(base + w.rows);
  p.counts = reinterpret_cast<int32_t*>(base + w.counts);
  status = dhsa_chunk_offsets_forward(&p, base, kernel_bytes, stream);
  if (status != DHSA_STATUS_OK) return status;
  return dhsa_chunk_offsets_pack(p.offsets, p.counts, p.batch, p.length, static_cast<int32_t*>(outputs[0]),
                                 static_cast<int64_t*>(outputs[1]), stream);
}

}  // namespace trt
}  // namespace dhsa
