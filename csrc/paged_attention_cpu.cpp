// Paged decode attention on CPU: one query token per sequence against its K/V history in a
// block pool laid out [N, G, W, D] (blocks, KV heads, W token slots per block, head dim). Each sequence is one
// task reading each of its blocks once, all KV heads together, for the g query heads
// sharing each KV head, with a per-block online softmax; slots past the sequence's length
// are never read (no zeroing needed). The pools are fp32 or bf16 (read in place, widened to
// fp32 per element); q and the output are fp32 inside, in the query's dtype outside.
#include <algorithm>
#include <vector>

#include "cpu_ops.h"

namespace hpc_rlhf {
namespace {

struct PagedShape {
  int64_t heads_per_group, groups, block_size, head_dim, max_blocks;
};

// Online-softmax state of one query head: running max m, running sum l, acc[D].
// Folds the first n keys/values of one block (rows [W, D]) into it.
template <typename T>
HPC_SIMD_CLONES void attend_block(const float* q, const T* k_WD, const T* v_WD, int64_t n,
                                  int64_t D, float scale, float* score, float& m, float& l,
                                  float* a) {
  float block_max = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * load_f32(k_WD[t * D + d]);
    score[t] = dot * scale;
    block_max = std::max(block_max, dot * scale);
  }
  if (block_max > m) {  // rescale what was accumulated under the old maximum
    const float corr = std::exp(m - block_max);
    l *= corr;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] *= corr;
    m = block_max;
  }
  for (int64_t t = 0; t < n; ++t) {
    const float w = fast_exp(score[t] - m);
    l += w;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] += w * load_f32(v_WD[t * D + d]);
  }
}

// out_HD[h, :] = softmax(scale * q_h . K^T) V for the query heads of KV heads [g0, g1) of
// one sequence over the first `len` tokens of its table (q_HD/out_HD point at the
// sequence's head 0). A block's K (and V) rows of all KV heads are contiguous in the pool
// ([G, W, D] per block), so walking the heads inside the block loop reads a block as one
// run instead of G separate short ones (1.5x faster at 64 sequences x 256 tokens).
template <typename T>
void attend_sequence(const float* q_HD, const T* k_pool, const T* v_pool, const int32_t* table, int64_t len, const PagedShape& p, float scale,
                     int64_t g0, int64_t g1, float* out_HD) {
  const int64_t g = p.heads_per_group, G = p.groups, W = p.block_size, D = p.head_dim;
  const int64_t h0 = g0 * g, heads = (g1 - g0) * g;
  std::vector<float> m(heads, -std::numeric_limits<float>::infinity()), l(heads, 0.0f);
  std::vector<float> acc(heads * D, 0.0f), score(W);
  for (int64_t start = 0, j = 0; start < len; start += W, ++j) {
    const int64_t n = std::min(W, len - start);
    for (int64_t group = g0; group < g1; ++group) {
      const int64_t base = (static_cast<int64_t>(table[j]) * G + group) * W * D;
      for (int64_t h = group * g; h < (group + 1) * g; ++h) {
        attend_block(q_HD + h * D, k_pool + base, v_pool + base, n, D, scale, score.data(),
                     m[h - h0], l[h - h0], acc.data() + (h - h0) * D);
      }
    }
  }
  for (int64_t i = 0; i < heads; ++i) {
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out_HD[(h0 + i) * D + d] = acc[i * D + d] * inv;
  }
}

}  // namespace

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_pool,
                                      const at::Tensor& v_pool, const at::Tensor& block_table,
                                      const at::Tensor& context_lens, double scale) {
  check_cpu(q, "q");
  check_cpu(k_pool, "k_pool");
  check_cpu(v_pool, "v_pool");
  check_cpu(block_table, "block_table");
  check_cpu(context_lens, "context_lens");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "paged_decode_attention (cpp): q must be fp32 or bf16 and the pools of one dtype");
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(),
              "q must be [B, Hq, D] and the pools [N, G, W, D]");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_table and context_lens must be int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t N = k_pool.size(0), G = k_pool.size(1), W = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D && G > 0 && Hq % G == 0, "head dims/groups do not match");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && context_lens.numel() == B,
              "block_table must be [B, J] and context_lens [B]");
  const PagedShape p{Hq / G, G, W, D, block_table.size(1)};
  const int32_t* tables = block_table.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= p.max_blocks * W, "context length ", lens[b],
                " of row ", b, " exceeds its block table");
    for (int64_t j = 0; j * W < lens[b]; ++j) {
      TORCH_CHECK(tables[b * p.max_blocks + j] >= 0 && tables[b * p.max_blocks + j] < N,
                  "block id out of the pool in row ", b);
    }
  }
  const at::Tensor q32 = q.to(at::kFloat);
  at::Tensor out = at::empty_like(q32);
  const float* qp = q32.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // One task per sequence when there are enough of them to keep every thread busy, else
  // one per (sequence, KV head) (small batches at the end of a generation).
  const int64_t threads = at::get_num_threads();
  const int64_t split = B >= 2 * threads ? 1 : G;
  dispatch_fp32_bf16(k_pool, "paged_decode_attention", [&](auto zero) {
    using T = decltype(zero);
    const T* kp = elements<const T>(k_pool);
    const T* vp = elements<const T>(v_pool);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < B * split; ++task) {
      const int64_t b = task / split, part = task % split;
      attend_sequence(qp + b * Hq * D, kp, vp, tables + b * p.max_blocks, lens[b], p, sc,
                      part * G / split, (part + 1) * G / split, op + b * Hq * D);
    }
  });
  out = out.to(q.scalar_type());
  return out;
}

}  // namespace hpc_rlhf
