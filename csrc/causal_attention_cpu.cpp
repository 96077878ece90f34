// Causal self-attention on CPU, forward and backward, over batches of packed segments.
//
// q [S, B, N, D] and k, v [S, B, G, D] (any strides, the head dim D contiguous and a
// multiple of 16; N query heads share G key/value heads). cu_seqlens [n + 1] splits the S
// positions of every batch row into segments that attend only within themselves, causally:
// {0, S} is a plain causal batch, B = 1 with the packed row's boundaries is the THD layout
// of models.packing. The output is [S, B, N, D] and the row log-sum-exp [B, N, S] is kept
// for the backward (flash-attention style: no [S, S] matrix outlives a block).
//
// The products run on a register-blocked micro-kernel (6 rows x 64 columns of fp32
// accumulators, the B operand's rows contiguous, the A operand read by broadcasts through
// two strides, so transposed operands cost nothing). Forward: one task per (row, segment,
// head); it transposes the head's keys once, then per 32-query block computes the scores
// against every key up to the block's last query, an exact softmax, and P V. Backward: one
// task per (row, segment, head) walking 32-key blocks, each against the 32-query blocks at
// or below it, accumulating the block's dK and dV locally and dQ in the output; grouped
// heads' dK/dV are summed by the caller. Tasks run longest first on a dynamic schedule.
// 32-row blocks waste less above the diagonal than 64 (forward 1.1x, backward 1.2x faster
// on 4 x 279-384-token segments) and the micro-kernel still fills its registers.
#include <algorithm>
#include <vector>

#include "cpu_ops.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors in always-inlined helpers

namespace hpc_rlhf {
namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t kQueryBlock = 32;  // query rows per softmax block (forward)
constexpr int64_t kBlock = 32;       // key and query block (backward)
constexpr int kRows = 6;        // rows of a micro-kernel tile (x 4 vectors: 24 accumulators)

inline __attribute__((always_inline)) v16 load16(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline __attribute__((always_inline)) void store16(float* p, v16 x) {
  std::memcpy(p, &x, sizeof(x));
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// A strided matrix operand: element (i, k) at p[i * rs + k * cs].
struct Operand {
  const float* p;
  int64_t rs, cs;
};

// C[i, 0:16*NV] (+)= sum_k A(i, k) B[k, 0:16*NV] for MR rows; B and C rows are contiguous.
template <int MR, int NV>
inline __attribute__((always_inline)) void gemm_tile(int64_t K, Operand a, const float* b,
                                                     int64_t b_rs, float* c, int64_t c_rs,
                                                     bool accumulate) {
  v16 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = accumulate ? load16(c + i * c_rs + 16 * v) : v16{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    v16 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load16(b + k * b_rs + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float ai = a.p[i * a.rs + k * a.cs];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += bv[v] * ai;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store16(c + i * c_rs + 16 * v, acc[i][v]);
  }
}

template <int MR>
inline __attribute__((always_inline)) void gemm_tile_cols(int64_t nv, int64_t K, Operand a,
                                                          const float* b, int64_t b_rs, float* c,
                                                          int64_t c_rs, bool accumulate) {
  switch (nv) {
    case 4: gemm_tile<MR, 4>(K, a, b, b_rs, c, c_rs, accumulate); break;
    case 3: gemm_tile<MR, 3>(K, a, b, b_rs, c, c_rs, accumulate); break;
    case 2: gemm_tile<MR, 2>(K, a, b, b_rs, c, c_rs, accumulate); break;
    default: gemm_tile<MR, 1>(K, a, b, b_rs, c, c_rs, accumulate); break;
  }
}

// C[M, N] (+)= A[M, K] B[K, N]; N a multiple of 16. Out of line (one copy per SIMD clone):
// a call is a whole block product, so it costs nothing measurable, while inlining the 24
// unrolled tile variants into the 7 call sites of each clone took minutes to compile.
HPC_SIMD_CLONES __attribute__((noinline)) void gemm(int64_t M, int64_t N, int64_t K, Operand a,
                                                const float* b, int64_t b_rs, float* c,
                                                int64_t c_rs, bool accumulate) {
  static_assert(kRows == 6, "the remainder switch below covers 1..5 rows");
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nv = std::min<int64_t>(4, (N - n0) / 16);
    int64_t i = 0;
    for (; i + kRows <= M; i += kRows) {
      gemm_tile_cols<kRows>(nv, K, {a.p + i * a.rs, a.rs, a.cs}, b + n0, b_rs, c + i * c_rs + n0,
                        c_rs, accumulate);
    }
    const Operand rest{a.p + i * a.rs, a.rs, a.cs};
    float* c_rest = c + i * c_rs + n0;
    switch (M - i) {  // the last rows in one narrower tile
      case 5: gemm_tile_cols<5>(nv, K, rest, b + n0, b_rs, c_rest, c_rs, accumulate); break;
      case 4: gemm_tile_cols<4>(nv, K, rest, b + n0, b_rs, c_rest, c_rs, accumulate); break;
      case 3: gemm_tile_cols<3>(nv, K, rest, b + n0, b_rs, c_rest, c_rs, accumulate); break;
      case 2: gemm_tile_cols<2>(nv, K, rest, b + n0, b_rs, c_rest, c_rs, accumulate); break;
      case 1: gemm_tile_cols<1>(nv, K, rest, b + n0, b_rs, c_rest, c_rs, accumulate); break;
      default: break;
    }
  }
}

// dst[d, c] = rows[c * ts + d] for c < n, 0 for n <= c < width: D x width, row-major.
inline void pack_transposed(const float* rows, int64_t ts, int64_t n, int64_t D, int64_t width,
                            float* dst) {
  for (int64_t c = 0; c < n; ++c) {  // rows read contiguously, columns written with stride
    const float* row = rows + c * ts;
    for (int64_t d = 0; d < D; ++d) dst[d * width + c] = row[d];
  }
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * width + n, dst + (d + 1) * width, 0.0f);
}

// Pointers and strides of one (batch row, segment, head): every tensor starts at the
// segment's first position; `*_ts` are position strides, lse is contiguous over positions.
struct HeadView {
  const float *q, *k, *v;
  int64_t q_ts, k_ts, v_ts;
  int64_t len, D;
  float scale;
};

// One head of one segment: its keys transposed once, then per block of query rows
// [r0, r1): scores against keys [0, r1), an exact softmax, P V -> out rows, lse.
HPC_SIMD_CLONES void forward_head(const HeadView& h, float* out, int64_t o_ts, float* lse,
                                  std::vector<float>& scratch) {
  const int64_t D = h.D, L = h.len, full = round16(L);
  scratch.resize(static_cast<size_t>((D + kQueryBlock) * full));
  float* kt = scratch.data();   // [D, full]
  float* s = kt + D * full;     // [rows of a block, width]
  pack_transposed(h.k, h.k_ts, L, D, full, kt);
  float inv[kQueryBlock];
  for (int64_t r0 = 0; r0 < L; r0 += kQueryBlock) {
    const int64_t r1 = std::min(L, r0 + kQueryBlock), nq = r1 - r0, width = round16(r1);
    gemm(nq, width, D, {h.q + r0 * h.q_ts, h.q_ts, 1}, kt, full, s, width, false);
    for (int64_t i = 0; i < nq; ++i) {
      float* row = s + i * width;
      const int64_t valid = r0 + i + 1;  // causal: keys 0..r0+i
      float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < valid; ++c) mx = std::max(mx, row[c]);
      mx *= h.scale;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < valid; ++c) {
        const float p = fast_exp(row[c] * h.scale - mx);
        row[c] = p;
        sum += p;
      }
      for (int64_t c = valid; c < width; ++c) row[c] = 0.0f;
      lse[r0 + i] = mx + std::log(sum);
      inv[i] = 1.0f / sum;
    }
    float* o = out + r0 * o_ts;
    gemm(nq, D, r1, {s, width, 1}, h.v, h.v_ts, o, o_ts, false);
    for (int64_t i = 0; i < nq; ++i) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[i * o_ts + d] *= inv[i];
    }
  }
}

// Gradient buffers of one head (the same position offsets as its HeadView).
struct HeadGrads {
  const float *out, *dout, *lse;
  int64_t o_ts, do_ts;
  float *dq, *dk, *dv;
  int64_t dq_ts, dk_ts, dv_ts;
};

struct BackwardScratch {
  std::vector<float> delta, kt, vt, p, ds, dk, dv;
};

// One key block [c0, c1) of one head against the query rows [c0, len) below it.
inline __attribute__((always_inline)) void backward_key_block(const HeadView& h,
                                                              const HeadGrads& g, int64_t c0,
                                                              int64_t c1, BackwardScratch& w) {
  const int64_t D = h.D, nk = c1 - c0, width = round16(nk);
  pack_transposed(h.k + c0 * h.k_ts, h.k_ts, nk, D, width, w.kt.data());
  pack_transposed(h.v + c0 * h.v_ts, h.v_ts, nk, D, width, w.vt.data());
  std::fill(w.dk.begin(), w.dk.end(), 0.0f);
  std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  float *p = w.p.data(), *ds = w.ds.data();
  for (int64_t r0 = c0; r0 < h.len; r0 += kBlock) {
    const int64_t r1 = std::min(h.len, r0 + kBlock), nq = r1 - r0;
    const float* q = h.q + r0 * h.q_ts;
    const float* dout = g.dout + r0 * g.do_ts;
    gemm(nq, width, D, {q, h.q_ts, 1}, w.kt.data(), width, p, width, false);  // scores
    gemm(nq, width, D, {dout, g.do_ts, 1}, w.vt.data(), width, ds, width, false);  // dP
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t r = r0 + i, valid = std::min(nk, r - c0 + 1);
      const float l = g.lse[r], dl = w.delta[r];
      float* prow = p + i * width;
      float* drow = ds + i * width;
#pragma omp simd
      for (int64_t c = 0; c < valid; ++c) {
        const float pc = fast_exp(prow[c] * h.scale - l);
        prow[c] = pc;
        drow[c] = pc * (drow[c] - dl) * h.scale;
      }
      for (int64_t c = valid; c < width; ++c) prow[c] = drow[c] = 0.0f;
    }
    gemm(nk, D, nq, {p, 1, width}, dout, g.do_ts, w.dv.data(), D, true);   // dV += P^T dO
    gemm(nq, D, nk, {ds, width, 1}, h.k + c0 * h.k_ts, h.k_ts, g.dq + r0 * g.dq_ts, g.dq_ts,
         true);                                                            // dQ += dS K
    gemm(nk, D, nq, {ds, 1, width}, q, h.q_ts, w.dk.data(), D, true);      // dK += dS^T Q
  }
  for (int64_t c = 0; c < nk; ++c) {
    std::memcpy(g.dk + (c0 + c) * g.dk_ts, w.dk.data() + c * D, D * sizeof(float));
    std::memcpy(g.dv + (c0 + c) * g.dv_ts, w.dv.data() + c * D, D * sizeof(float));
  }
}

HPC_SIMD_CLONES void backward_head(const HeadView& h, const HeadGrads& g, BackwardScratch& w) {
  const int64_t D = h.D, L = h.len;
  w.delta.resize(L);
  for (int64_t r = 0; r < L; ++r) {
    float dot = 0.0f;
    const float* o = g.out + r * g.o_ts;
    const float* dout = g.dout + r * g.do_ts;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += o[d] * dout[d];
    w.delta[r] = dot;
    std::fill(g.dq + r * g.dq_ts, g.dq + r * g.dq_ts + D, 0.0f);
  }
  w.kt.resize(D * kBlock);
  w.vt.resize(D * kBlock);
  w.p.resize(kBlock * kBlock);
  w.ds.resize(kBlock * kBlock);
  w.dk.resize(kBlock * D);
  w.dv.resize(kBlock * D);
  for (int64_t c0 = 0; c0 < L; c0 += kBlock) {
    backward_key_block(h, g, c0, std::min(L, c0 + kBlock), w);
  }
}

// Validated shapes of a call.
struct Problem {
  int64_t S, B, N, G, D;
  std::vector<int64_t> cu;  // segment boundaries over S
};

Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cu_seqlens, double scale) {
  TORCH_CHECK(scale > 0.0, "causal_attention (cpp): softmax scale must be positive, got ", scale);
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4,
                "causal_attention (cpp): q, k and v must be 4-D fp32 CPU tensors");
    TORCH_CHECK(t->stride(3) == 1, "causal_attention (cpp): the head dim must be contiguous");
  }
  Problem pr{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), {}};
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == pr.S && k.size(1) == pr.B &&
                  k.size(3) == pr.D,
              "causal_attention (cpp): k and v must be [S, B, G, D] matching q [S, B, N, D]");
  TORCH_CHECK(pr.G > 0 && pr.N % pr.G == 0, "causal_attention (cpp): ", pr.N,
              " query heads are not a multiple of ", pr.G, " key/value heads");
  TORCH_CHECK(pr.D % 16 == 0, "causal_attention (cpp): head dim ", pr.D,
              " is not a multiple of 16");
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2,
              "causal_attention (cpp): cu_seqlens must be a 1-D CPU tensor [segments + 1]");
  at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  pr.cu.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  TORCH_CHECK(pr.cu.front() == 0 && pr.cu.back() == pr.S, "causal_attention (cpp): cu_seqlens ",
              "must run from 0 to the sequence length ", pr.S);
  for (size_t i = 1; i < pr.cu.size(); ++i) {
    TORCH_CHECK(pr.cu[i] >= pr.cu[i - 1], "causal_attention (cpp): cu_seqlens must not decrease");
  }
  return pr;
}

// (batch row, segment start, segment length, head) of every non-empty segment's heads.
struct HeadTask {
  int64_t b, start, len, head;
};

std::vector<HeadTask> head_tasks(const Problem& pr) {
  std::vector<HeadTask> tasks;
  for (int64_t b = 0; b < pr.B; ++b) {
    for (size_t s = 0; s + 1 < pr.cu.size(); ++s) {
      const int64_t len = pr.cu[s + 1] - pr.cu[s];
      for (int64_t h = 0; len > 0 && h < pr.N; ++h) tasks.push_back({b, pr.cu[s], len, h});
    }
  }
  // Longest first, so the dynamic schedule does not end on one long segment.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const HeadTask& x, const HeadTask& y) { return x.len > y.len; });
  return tasks;
}

HeadView head_view(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const Problem& pr, const HeadTask& t, float scale) {
  const int64_t g = t.head / (pr.N / pr.G);
  return {q.data_ptr<float>() + t.start * q.stride(0) + t.b * q.stride(1) + t.head * q.stride(2),
          k.data_ptr<float>() + t.start * k.stride(0) + t.b * k.stride(1) + g * k.stride(2),
          v.data_ptr<float>() + t.start * v.stride(0) + t.b * v.stride(1) + g * v.stride(2),
          q.stride(0),
          k.stride(0),
          v.stride(0),
          t.len,
          pr.D,
          scale};
}

// Offset of position `start` of (b, head) in a contiguous [S, B, H, D] tensor.
int64_t sbhd_offset(const Problem& pr, int64_t heads, const HeadTask& t) {
  return ((t.start * pr.B + t.b) * heads + t.head) * pr.D;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cpu(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const at::Tensor& cu_seqlens,
                                                            double scale) {
  const Problem pr = check_inputs(q, k, v, cu_seqlens, scale);
  at::Tensor out = at::empty({pr.S, pr.B, pr.N, pr.D}, q.options());
  at::Tensor lse = at::empty({pr.B, pr.N, pr.S}, q.options());
  const std::vector<HeadTask> heads = head_tasks(pr);
  const int64_t o_ts = pr.B * pr.N * pr.D;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < heads.size(); ++i) {
      const HeadTask& t = heads[i];
      const HeadView h = head_view(q, k, v, pr, t, static_cast<float>(scale));
      float* o = out.data_ptr<float>() + sbhd_offset(pr, pr.N, t);
      float* l = lse.data_ptr<float>() + (t.b * pr.N + t.head) * pr.S + t.start;
      forward_head(h, o, o_ts, l, scratch);
    }
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, const at::Tensor& cu_seqlens,
    double scale) {
  const Problem pr = check_inputs(q, k, v, cu_seqlens, scale);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({pr.B, pr.N, pr.S}),
              "causal_attention_bwd (cpp): out and lse must be the forward's outputs");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == at::kFloat &&
                  grad_out.stride(3) == 1,
              "causal_attention_bwd (cpp): grad_out must be fp32 [S, B, N, D], D contiguous");
  // dK, dV per query head; the caller sums the heads of a group (grouped-query attention).
  at::Tensor dq = at::empty({pr.S, pr.B, pr.N, pr.D}, q.options());
  at::Tensor dk = at::empty({pr.S, pr.B, pr.N, pr.D}, q.options());
  at::Tensor dv = at::empty({pr.S, pr.B, pr.N, pr.D}, q.options());
  const std::vector<HeadTask> heads = head_tasks(pr);
  const int64_t ts = pr.B * pr.N * pr.D;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    BackwardScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < heads.size(); ++i) {
      const HeadTask& t = heads[i];
      const HeadView h = head_view(q, k, v, pr, t, static_cast<float>(scale));
      const int64_t off = sbhd_offset(pr, pr.N, t);
      const int64_t g_off = t.start * grad_out.stride(0) + t.b * grad_out.stride(1) +
                            t.head * grad_out.stride(2);
      const HeadGrads g{out.data_ptr<float>() + off,
                        grad_out.data_ptr<float>() + g_off,
                        lse.data_ptr<float>() + (t.b * pr.N + t.head) * pr.S + t.start,
                        ts,
                        grad_out.stride(0),
                        dq.data_ptr<float>() + off,
                        dk.data_ptr<float>() + off,
                        dv.data_ptr<float>() + off,
                        ts,
                        ts,
                        ts};
      backward_head(h, g, scratch);
    }
  }
  return {dq, dk, dv};
}

}  // namespace hpc_rlhf
