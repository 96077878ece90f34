// Token log-probs / entropy on CPU: one pass over each row with an online max and sum-exp.
// Rows are split over OpenMP threads; each row is walked in chunks of kChunk logits that stay
// in L1 (max of the chunk, rescale the running sums if it grew, then a vectorised sum of
// exp and exp * (x - m)). bf16/fp16 chunks are first converted to an fp32 L1 buffer.
#include <algorithm>
#include <limits>

#include "cpu_ops.h"

namespace hpc_rlhf {
namespace {

constexpr int64_t kChunk = 2048;

// Fold chunk x[0:n] into the running (m, s = sum e^(x-m), t = sum e^(x-m) (x-m)) of a row.
HPC_SIMD_CLONES void chunk_stats(const float* __restrict x, int64_t n, int entropy, float* m_io,
                                 float* s_io, float* t_io) {
  float cm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cm)
  for (int64_t i = 0; i < n; ++i) cm = x[i] > cm ? x[i] : cm;
  float m = *m_io, s = *s_io, t = *t_io;
  if (cm > m) {
    if (s > 0.0f) {
      const float d = m - cm, a = std::exp(d);
      t = a * (t + d * s);
      s *= a;
    }
    m = cm;
  }
  if (m == -std::numeric_limits<float>::infinity()) return;  // all -inf so far: adds nothing
  float cs = 0.0f, ct = 0.0f;
  if (entropy) {
#pragma omp simd reduction(+ : cs, ct)
    for (int64_t i = 0; i < n; ++i) {
      const float d = std::max(x[i] - m, -88.0f);
      const float e = fast_exp(d);
      cs += e;
      ct += e * d;
    }
  } else {
#pragma omp simd reduction(+ : cs)
    for (int64_t i = 0; i < n; ++i) cs += fast_exp(x[i] - m);
  }
  *m_io = m;
  *s_io = s + cs;
  *t_io = t + ct;
}

// grad[i] = -p_i * (g + ge * (log p_i + ent)), log p_i = (x_i - m) - log_s; fp32 out.
HPC_SIMD_CLONES void chunk_grad(const float* __restrict x, int64_t n, float m, float log_s,
                                float ent, float g, float ge, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float lp = std::max((x[i] - m) - log_s, -88.0f);
    out[i] = -fast_exp(lp) * (g + ge * (lp + ent));
  }
}

HPC_SIMD_CLONES void bf16_to_float(const uint16_t* __restrict in, int64_t n, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
    std::memcpy(out + i, &bits, 4);
  }
}

// Round to nearest even (finite inputs; gradients here are finite).
HPC_SIMD_CLONES void float_to_bf16(const float* __restrict in, int64_t n, uint16_t* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, in + i, 4);
    out[i] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

// Pointer to chunk [c0, c0 + n) of a row as fp32: the row itself for fp32, else `buf`.
template <typename T>
inline const float* as_float(const T* row, int64_t c0, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row + c0;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(row + c0), n, buf);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[c0 + i]);
    return buf;
  }
}

template <typename T>
void fwd_rows(const T* x, const int64_t* labels, int64_t rows, int64_t vocab, int64_t start,
              bool entropy, float* m, float* s, float* t, float* xl) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(at::get_num_threads()) \
    if (rows * vocab >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    alignas(64) float buf[kChunk];
    const T* row = x + r * vocab;
    float rm = -std::numeric_limits<float>::infinity(), rs = 0.0f, rt = 0.0f;
    for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c0);
      chunk_stats(as_float(row, c0, n, buf), n, entropy, &rm, &rs, &rt);
    }
    const int64_t local = labels[r] - start;
    m[r] = rm;
    s[r] = rs;
    t[r] = rt;
    xl[r] = (local >= 0 && local < vocab) ? static_cast<float>(row[local]) : 0.0f;
  }
}

template <typename T>
void bwd_rows(const T* x, const int64_t* labels, int64_t rows, int64_t vocab, int64_t start,
              const float* m, const float* log_s, const float* ent, const float* g_lp, const float* g_ent, T* grad) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(at::get_num_threads()) \
    if (rows * vocab >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    alignas(64) float in_buf[kChunk];
    alignas(64) float out_buf[kChunk];
    const T* row = x + r * vocab;
    T* grow = grad + r * vocab;
    const float g = g_lp[r], ge = g_ent ? g_ent[r] : 0.0f, h = ent ? ent[r] : 0.0f;
    const int64_t local = labels[r] - start;
    for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c0);
      float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(grow + c0) : out_buf;
      chunk_grad(as_float(row, c0, n, in_buf), n, m[r], log_s[r], h, g, ge, out);
      if (local >= c0 && local < c0 + n) out[local - c0] += g;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        float_to_bf16(out_buf, n, reinterpret_cast<uint16_t*>(grow + c0));
      } else if constexpr (std::is_same_v<T, at::Half>) {
        for (int64_t i = 0; i < n; ++i) grow[c0 + i] = static_cast<at::Half>(out_buf[i]);
      }
    }
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  check_cpu(logits, "logits");
  check_cpu(labels, "labels");
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V]");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "labels must be [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, bool entropy) {
  check_inputs(logits, labels);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor m = at::empty({rows}, opts), s = at::empty({rows}, opts);
  at::Tensor t = at::empty({rows}, opts), xl = at::empty({rows}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_fwd",
                                  [&] {
                                    fwd_rows<scalar_t>(logits.data_ptr<scalar_t>(),
                                                       labels.data_ptr<int64_t>(), rows, vocab,
                                                       vocab_start, entropy, m.data_ptr<float>(),
                                                       s.data_ptr<float>(), t.data_ptr<float>(),
                                                       xl.data_ptr<float>());
                                  });
  return {m, s, t, xl};
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                            int64_t vocab_start, const at::Tensor& m,
                            const at::Tensor& log_s,
                            const std::optional<at::Tensor>& ent, const at::Tensor& g_lp,
                            const std::optional<at::Tensor>& g_ent) {
  check_inputs(logits, labels);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  for (const at::Tensor* v : {&m, &log_s, &g_lp}) {
    check_cpu(*v, "row vector");
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->numel() == rows, "row vectors: fp32 [N]");
  }
  TORCH_CHECK(ent.has_value() == g_ent.has_value(), "ent and g_ent go together");
  const float* ent_p = ent ? ent->data_ptr<float>() : nullptr;
  const float* g_ent_p = g_ent ? g_ent->data_ptr<float>() : nullptr;
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_bwd",
                                  [&] {
                                    bwd_rows<scalar_t>(logits.data_ptr<scalar_t>(),
                                                       labels.data_ptr<int64_t>(), rows, vocab,
                                                       vocab_start, m.data_ptr<float>(),
                                                       log_s.data_ptr<float>(), ent_p,
                                                       g_lp.data_ptr<float>(), g_ent_p,
                                                       grad.data_ptr<scalar_t>());
                                  });
  return grad;
}

}  // namespace hpc_rlhf
