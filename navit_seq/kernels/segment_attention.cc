// Segment-blocked softmax attention for packed sequences, forward and backward, as XLA:CPU
// FFI custom calls (see segment_attention.py for the JAX side and why it exists).
//
// A packed row holds several images; token q may attend to token k only when
// segment_ids[q] == segment_ids[k] > 0. Instead of computing all L x L scores and masking
// most of them, each (row, head) task groups the row's tokens by segment id and runs dense
// attention on each group alone: an image of n tokens costs n^2 instead of n * L, and the
// n x n score block stays in the core's L2 cache. Grouping gathers token indices, so a segment
// need not be contiguous. Padding tokens (segment ids <= 0) get zero outputs and zero gradients.
//
// Layout: q, k, v, o, do, dq, dk, dv are [N, L, H, D] float32 (N = all leading dims); segment
// ids [N, L] int32; lse [N, L, H] float32, the log-sum-exp of each query's scores (0 for
// padding). The backward pass recomputes scores and probabilities from lse (FlashAttention's
// recomputation), so nothing of size L x L is kept between the passes.
//
// Matmuls use one register-blocked micro-kernel written with GCC vector extensions (16 floats,
// one AVX-512 register; the compiler splits it on narrower machines). Dims are padded with
// zeros to multiples of 16 inside the per-task buffers, so the micro-kernel has no tails.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned access
typedef int32_t i16 __attribute__((vector_size(64)));

constexpr int kLanes = 16;
// Micro-kernel block: 8 rows x 2 vectors (16 accumulators). Measured on the benchmark's
// attention (Zen 4): 8 x 2 and 8 x 3 ran alike, 4 x 4 took 1.3x as long.
constexpr int kRows = 8;
constexpr int kMaxVecs = 2;

inline int RoundUp(int x, int m) { return (x + m - 1) / m * m; }
inline v16 Load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void Store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline v16 Splat(float x) { return v16{} + x; }
inline float Sum(v16 x) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}
inline float Max(v16 x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}

// exp(x) for x <= 0 (scores minus their row maximum), Cephes' single-precision polynomial:
// relative error ~2e-7 on [-87, 0]; below -87 the result flushes towards 0.
inline v16 Exp(v16 x) {
  x = x < Splat(-87.f) ? Splat(-87.f) : x;
  const v16 shifter = Splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  v16 n = x * 1.44269504088896341f + shifter;
  n = n - shifter;
  v16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v16 p = Splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// C[0:kRows, 0:16V] (+)= A[0:kRows, 0:depth] . B[0:depth, 0:16V]; A(i, p) is A[i*lda + p], or
// A[p*lda + i] when TransA (so A^T . B needs no transposed copy).
template <int V, bool TransA>
inline void MicroKernel(int depth, const float* a, int lda, const float* b, int ldb, float* c,
                        int ldc, bool accumulate) {
  v16 acc[kRows][V];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = accumulate ? Load(c + r * ldc + j * kLanes) : v16{};
  for (int p = 0; p < depth; ++p) {
    v16 bv[V];
    for (int j = 0; j < V; ++j) bv[j] = Load(b + p * ldb + j * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float ar = TransA ? a[p * lda + r] : a[r * lda + p];
      for (int j = 0; j < V; ++j) acc[r][j] += ar * bv[j];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < V; ++j) Store(c + r * ldc + j * kLanes, acc[r][j]);
}

// C[M, N] (+)= op(A)[M, depth] . B[depth, N], with M a multiple of kRows and N of 16
// (np, a multiple of 16, is a multiple of kRows = 8).
template <bool TransA>
void Gemm(int m, int n, int depth, const float* a, int lda, const float* b, int ldb, float* c,
          int ldc, bool accumulate = false) {
  for (int i = 0; i < m; i += kRows) {
    const float* a_rows = TransA ? a + i : a + i * lda;
    for (int j = 0; j < n; j += kMaxVecs * kLanes) {
      const float* bj = b + j;
      float* cij = c + i * ldc + j;
      if (n - j >= 2 * kLanes) {
        MicroKernel<2, TransA>(depth, a_rows, lda, bj, ldb, cij, ldc, accumulate);
      } else {
        MicroKernel<1, TransA>(depth, a_rows, lda, bj, ldb, cij, ldc, accumulate);
      }
    }
  }
}

// One row's tokens grouped by segment id: members[starts[g] : starts[g + 1]] are the token
// indices of group g in increasing order; padding (segment ids <= 0, which attend to nothing
// and are attended by nothing, as in segment_attend_mask) is left out.
struct Groups {
  std::vector<int> members, starts;
};

Groups GroupBySegment(const int32_t* segment_ids, int length) {
  Groups groups;
  std::vector<std::pair<int32_t, int>> keyed;
  keyed.reserve(length);
  for (int t = 0; t < length; ++t)
    if (segment_ids[t] > 0) keyed.emplace_back(segment_ids[t], t);
  std::sort(keyed.begin(), keyed.end());  // by segment, then token index
  for (size_t i = 0; i < keyed.size(); ++i) {
    if (i == 0 || keyed[i].first != keyed[i - 1].first) groups.starts.push_back(i);
    groups.members.push_back(keyed[i].second);
  }
  groups.starts.push_back(keyed.size());
  return groups;
}

struct Shape {
  int64_t batch;  // product of leading dims
  int length, heads, head_dim;
  int64_t TokenOffset(int64_t b, int t, int h) const {
    return ((b * length + t) * heads + h) * head_dim;
  }
};

// Per-thread scratch, reused across tasks. Every buffer taken from it is fully written
// (Gather fills the padding with zeros; Gemm writes its whole output) before it is read.
struct Scratch {
  std::vector<float> buf;
  float* Take(size_t count) {
    if (buf.size() < count) buf.resize(count);
    return buf.data();
  }
};

// Copies the group's rows of x (one head), scaled, into dst [np, dp], or transposed into
// [dp, np]; the padding (rows >= n, columns >= head_dim) is set to zero.
void Gather(const float* x, const Shape& s, int64_t b, int h, const int* idx, int n, int dp,
            int np, float scale, bool transpose, float* dst) {
  const int dim = s.head_dim;
  if (transpose) {
    // 16 tokens at a time, so each write fills one cache line of dst's row d.
    const float* rows[kLanes];
    for (int start = 0; start < np; start += kLanes) {
      const int count = std::max(0, std::min(kLanes, n - start));
      for (int t = 0; t < count; ++t) rows[t] = x + s.TokenOffset(b, idx[start + t], h);
      for (int d = 0; d < dp; ++d) {
        float* out = dst + d * np + start;
        for (int t = 0; t < kLanes; ++t) out[t] = (t < count && d < dim) ? rows[t][d] * scale : 0.f;
      }
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    const float* row = x + s.TokenOffset(b, idx[i], h);
    float* out = dst + i * dp;
    for (int d = 0; d < dim; ++d) out[d] = row[d] * scale;
    for (int d = dim; d < dp; ++d) out[d] = 0.f;
  }
  std::memset(dst + n * dp, 0, sizeof(float) * (np - n) * dp);
}

void Scatter(const float* src, int dp, const Shape& s, int64_t b, int h, const int* idx, int n,
             float scale, float* x) {
  for (int i = 0; i < n; ++i) {
    float* row = x + s.TokenOffset(b, idx[i], h);
    for (int d = 0; d < s.head_dim; ++d) row[d] = src[i * dp + d] * scale;
  }
}

void ZeroPadding(const int32_t* seg, const Shape& s, int64_t b, int h, float* x) {
  for (int t = 0; t < s.length; ++t)
    if (seg[t] <= 0) std::memset(x + s.TokenOffset(b, t, h), 0, s.head_dim * sizeof(float));
}

// scores [np, np] -> probabilities for rows < n (columns >= n set to 0). With lse == nullptr
// the row's softmax is computed and its log-sum-exp written to lse_out; otherwise the stored
// lse is used (backward recomputation).
void Softmax(float* scores, int n, int np, const float* lse, float* lse_out) {
  for (int i = 0; i < n; ++i) {
    float* row = scores + i * np;
    for (int j = n; j < np; ++j) row[j] = -INFINITY;
    float shift;
    if (lse == nullptr) {
      v16 m = Splat(-INFINITY);
      for (int j = 0; j < np; j += kLanes) {
        v16 x = Load(row + j);
        m = x > m ? x : m;
      }
      shift = Max(m);
    } else {
      shift = lse[i];
    }
    v16 total{};
    for (int j = 0; j < np; j += kLanes) {
      v16 e = Exp(Load(row + j) - shift);
      v16 x = Load(row + j);
      e = x == Splat(-INFINITY) ? v16{} : e;
      Store(row + j, e);
      total += e;
    }
    if (lse == nullptr) {
      const float sum = Sum(total);
      const v16 inv = Splat(1.f / sum);
      for (int j = 0; j < np; j += kLanes) Store(row + j, Load(row + j) * inv);
      lse_out[i] = shift + std::log(sum);
    }
  }
}

void ForwardTask(const float* q, const float* k, const float* v, const int32_t* seg,
                 const Shape& s, float scale, int64_t b, int h, const Groups& groups, float* o,
                 float* lse, Scratch& scratch) {
  const int dp = RoundUp(s.head_dim, kLanes);
  ZeroPadding(seg + b * s.length, s, b, h, o);
  std::vector<float> group_lse;
  for (size_t g = 0; g + 1 < groups.starts.size(); ++g) {
    const int* idx = groups.members.data() + groups.starts[g];
    const int n = groups.starts[g + 1] - groups.starts[g];
    const int np = RoundUp(n, kLanes);
    float* qs = scratch.Take(size_t(np) * (3 * dp + np) + size_t(dp) * np);
    float* kt = qs + np * dp;          // [dp, np]
    float* vb = kt + dp * np;          // [np, dp]
    float* scores = vb + np * dp;      // [np, np]
    float* out = scores + np * np;     // [np, dp]
    Gather(q, s, b, h, idx, n, dp, np, scale, false, qs);
    Gather(k, s, b, h, idx, n, dp, np, 1.f, true, kt);
    Gather(v, s, b, h, idx, n, dp, np, 1.f, false, vb);
    Gemm<false>(np, np, dp, qs, dp, kt, np, scores, np);
    group_lse.resize(n);
    Softmax(scores, n, np, nullptr, group_lse.data());
    Gemm<false>(np, dp, n, scores, np, vb, dp, out, dp);
    Scatter(out, dp, s, b, h, idx, n, 1.f, o);
    for (int i = 0; i < n; ++i) lse[(b * s.length + idx[i]) * s.heads + h] = group_lse[i];
  }
  for (int t = 0; t < s.length; ++t)
    if (seg[b * s.length + t] <= 0) lse[(b * s.length + t) * s.heads + h] = 0.f;
}

void BackwardTask(const float* q, const float* k, const float* v, const int32_t* seg,
                  const float* o, const float* lse, const float* d_o, const Shape& s, float scale,
                  int64_t b, int h, const Groups& groups, float* dq, float* dk, float* dv,
                  Scratch& scratch) {
  const int dp = RoundUp(s.head_dim, kLanes);
  for (float* x : {dq, dk, dv}) ZeroPadding(seg + b * s.length, s, b, h, x);
  std::vector<float> group_lse, delta;
  for (size_t g = 0; g + 1 < groups.starts.size(); ++g) {
    const int* idx = groups.members.data() + groups.starts[g];
    const int n = groups.starts[g + 1] - groups.starts[g];
    const int np = RoundUp(n, kLanes);
    float* qs = scratch.Take(size_t(np) * (7 * dp + 2 * np) + size_t(2) * dp * np);
    float* kb = qs + np * dp;         // [np, dp]
    float* kt = kb + np * dp;         // [dp, np]
    float* vt = kt + dp * np;         // [dp, np]
    float* ob = vt + dp * np;         // [np, dp]
    float* dob = ob + np * dp;        // [np, dp]
    float* probs = dob + np * dp;     // [np, np]
    float* dscores = probs + np * np; // [np, np]
    float* grad = dscores + np * np;  // [np, dp], reused for dq, dk, dv
    Gather(q, s, b, h, idx, n, dp, np, scale, false, qs);
    Gather(k, s, b, h, idx, n, dp, np, 1.f, false, kb);
    Gather(k, s, b, h, idx, n, dp, np, 1.f, true, kt);
    Gather(v, s, b, h, idx, n, dp, np, 1.f, true, vt);
    Gather(o, s, b, h, idx, n, dp, np, 1.f, false, ob);
    Gather(d_o, s, b, h, idx, n, dp, np, 1.f, false, dob);
    group_lse.resize(n);
    delta.resize(n);
    for (int i = 0; i < n; ++i) {
      group_lse[i] = lse[(b * s.length + idx[i]) * s.heads + h];
      float dot = 0.f;  // delta_i = sum_d dO[i, d] * O[i, d] = sum_j P[i, j] * dP[i, j]
      for (int d = 0; d < dp; ++d) dot += dob[i * dp + d] * ob[i * dp + d];
      delta[i] = dot;
    }
    Gemm<false>(np, np, dp, qs, dp, kt, np, probs, np);  // scores
    Softmax(probs, n, np, group_lse.data(), nullptr);    // P, recomputed
    Gemm<false>(np, np, dp, dob, dp, vt, np, dscores, np);  // dP = dO . V^T
    for (int i = 0; i < n; ++i) {
      const v16 di = Splat(delta[i]);
      for (int j = 0; j < np; j += kLanes) {
        Store(dscores + i * np + j,
              Load(probs + i * np + j) * (Load(dscores + i * np + j) - di));  // dS
      }
    }
    Gemm<true>(np, dp, n, probs, np, dob, dp, grad, dp);  // dV = P^T . dO
    Scatter(grad, dp, s, b, h, idx, n, 1.f, dv);
    Gemm<false>(np, dp, n, dscores, np, kb, dp, grad, dp);  // dQs = dS . K
    Scatter(grad, dp, s, b, h, idx, n, scale, dq);
    Gemm<true>(np, dp, n, dscores, np, qs, dp, grad, dp);  // dK = dS^T . Qs
    Scatter(grad, dp, s, b, h, idx, n, 1.f, dk);
  }
}

// Runs task(b, h, scratch) for every (row, head) on the caller thread and up to
// num_threads - 1 pool threads. XLA may run scheduled work late or on the caller thread
// itself, so the caller waits only for helpers that started before it ran out of work.
template <typename Task>
void ParallelOverRowsAndHeads(ffi::ThreadPool& pool, const Shape& s, Task task) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::condition_variable done;
    int active = 0;
    bool closed = false;
  };
  auto state = std::make_shared<State>();
  const int64_t total = s.batch * s.heads;
  auto work = [state, total, &s, &task] {
    thread_local Scratch scratch;
    for (int64_t i; (i = state->next.fetch_add(1)) < total;) task(i / s.heads, i % s.heads, scratch);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([state, work] {
      {
        std::lock_guard<std::mutex> lock(state->mutex);
        if (state->closed) return;
        ++state->active;
      }
      work();
      std::lock_guard<std::mutex> lock(state->mutex);
      if (--state->active == 0) state->done.notify_all();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->closed = true;
  state->done.wait(lock, [&] { return state->active == 0; });
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::S32>& seg,
                       Shape* shape) {
  const auto dims = q.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("query must be [..., L, H, D]");
  const size_t rank = dims.size();
  shape->length = dims[rank - 3];
  shape->heads = dims[rank - 2];
  shape->head_dim = dims[rank - 1];
  shape->batch = 1;
  for (size_t i = 0; i + 3 < rank; ++i) shape->batch *= dims[i];
  if (seg.element_count() != shape->batch * shape->length)
    return ffi::Error::InvalidArgument("segment_ids must be [..., L] matching query");
  return ffi::Error::Success();
}

std::vector<Groups> AllGroups(const int32_t* seg, const Shape& s) {
  std::vector<Groups> groups(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) groups[b] = GroupBySegment(seg + b * s.length, s.length);
  return groups;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, float scale,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (ffi::Error e = CheckShapes(q, seg, &s); e.failure()) return e;
  const std::vector<Groups> groups = AllGroups(seg.typed_data(), s);
  ParallelOverRowsAndHeads(pool, s, [&](int64_t b, int h, Scratch& scratch) {
    ForwardTask(q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), s, scale, b, h,
                groups[b], o->typed_data(), lse->typed_data(), scratch);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o, float scale,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Shape s;
  if (ffi::Error e = CheckShapes(q, seg, &s); e.failure()) return e;
  const std::vector<Groups> groups = AllGroups(seg.typed_data(), s);
  ParallelOverRowsAndHeads(pool, s, [&](int64_t b, int h, Scratch& scratch) {
    BackwardTask(q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
                 o.typed_data(), lse.typed_data(), d_o.typed_data(), s, scale, b, h, groups[b],
                 dq->typed_data(), dk->typed_data(), dv->typed_data(), scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NavitSegmentAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // segment_ids
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(NavitSegmentAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // segment_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_o
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
);
