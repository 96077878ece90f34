// Paged decode attention on CPU: one query token per sequence against its K/V history in a
// block pool laid out [N, G, S, D] (blocks, KV heads, slots, head dim). Each (sequence, KV
// head) task reads its blocks once for the g query heads sharing them, with a per-block
// online softmax; slots past the sequence's length are never read (no zeroing needed).
#include <algorithm>
#include <vector>

#include "cpu_ops.h"

namespace hpc_rlhf {
namespace {

struct PagedShape {
  int64_t heads_per_group, groups, block_size, head_dim, max_blocks;
};

// out_gD[h, :] = softmax(scale * q_h . K^T) V over the first `len` tokens of the table.
HPC_SIMD_CLONES void attend_one(const float* q_gD, const float* k_pool, const float* v_pool,
                                const int32_t* table, int64_t len, int64_t group,
                                const PagedShape& p, float scale, float* out_gD) {
  const int64_t g = p.heads_per_group, S = p.block_size, D = p.head_dim;
  std::vector<float> m(g, -std::numeric_limits<float>::infinity()), l(g, 0.0f);
  std::vector<float> acc(g * D, 0.0f), score(g * S);
  for (int64_t start = 0, j = 0; start < len; start += S, ++j) {
    const int64_t n = std::min(S, len - start);
    const int64_t base = (static_cast<int64_t>(table[j]) * p.groups + group) * S * D;
    const float* k_SD = k_pool + base;
    const float* v_SD = v_pool + base;
    for (int64_t h = 0; h < g; ++h) {
      const float* q = q_gD + h * D;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q[d] * k_SD[t * D + d];
        score[h * S + t] = dot * scale;
        block_max = std::max(block_max, dot * scale);
      }
      float* a = acc.data() + h * D;
      if (block_max > m[h]) {  // rescale what was accumulated under the old maximum
        const float corr = std::exp(m[h] - block_max);
        l[h] *= corr;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= corr;
        m[h] = block_max;
      }
      for (int64_t t = 0; t < n; ++t) {
        const float w = fast_exp(score[h * S + t] - m[h]);
        l[h] += w;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += w * v_SD[t * D + d];
      }
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out_gD[h * D + d] = acc[h * D + d] * inv;
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
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
                  v_pool.scalar_type() == at::kFloat,
              "paged_decode_attention (cpp): q and the pools must be fp32");
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(),
              "q must be [B, Hq, D] and the pools [N, G, S, D]");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_table and context_lens must be int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t N = k_pool.size(0), G = k_pool.size(1), S = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D && G > 0 && Hq % G == 0, "head dims/groups do not match");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && context_lens.numel() == B,
              "block_table must be [B, J] and context_lens [B]");
  const PagedShape p{Hq / G, G, S, D, block_table.size(1)};
  const int32_t* tables = block_table.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= p.max_blocks * S, "context length ", lens[b],
                " of row ", b, " exceeds its block table");
    for (int64_t j = 0; j * S < lens[b]; ++j) {
      TORCH_CHECK(tables[b * p.max_blocks + j] >= 0 && tables[b * p.max_blocks + j] < N,
                  "block id out of the pool in row ", b);
    }
  }
  at::Tensor out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < B * G; ++task) {
    const int64_t b = task / G, group = task % G;
    const int64_t offset = (b * Hq + group * p.heads_per_group) * D;
    attend_one(qp + offset, kp, vp, tables + b * p.max_blocks, lens[b], group, p, sc,
               op + offset);
  }
  return out;
}

}  // namespace hpc_rlhf
