// Block-sparse attention on CPU: visit only the key tiles of a tile schedule, fused per query tile.
//
// Layouts (all contiguous, tokens already in the schedule's permuted order):
//   q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], out [B, H, Nq, Dv], lse [B, H, Nq]
//   q_bounds [nQT + 1], kv_bounds [nKT + 1]      tile offsets (int64)
//   kv_tiles [nQT, V]                             visited key tiles, ascending, -1 padded (int64)
//   part_idx [nQT, V]                             index into part_mask for partial tiles, -1 for full (int64)
//   part_mask [nP, TQ, TK]                        element masks of the partial tiles (bool)
// The grouped entry points (run-time schedules, one per (batch, head)) take q_bounds [G, nQT + 1],
// kv_tiles / part_idx [G, nQT, V] with G = 1 or B * H (shorter groups pad with empty tiles), and optional
// row_bounds [G, Nq, 2] (int64): row i only sees keys in [lo_i, hi_i) (e.g. causal: [0, i + 1)).
//
// One work item is (batch, head, query tile). Its visited key tiles are cut into chunks of at most
// kChunk keys; runs of consecutive tiles that are contiguous in memory become one GEMM (the MKL BLAS
// that libtorch links). Scores live in a per-thread buffer; chunks merge by the online softmax.
// Masked scores hold a large negative sentinel instead of -inf (the exp loops are vectorized); rows with no visible key end with l == 0 and are written as zeros, lse = -inf.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

// Fortran BLAS from the MKL that libtorch_cpu links and exports (column-major, 32-bit ints).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
int MKL_Set_Num_Threads_Local(int nt);  // per-thread MKL threads: 1 inside our parallel loop
}

namespace {

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                      int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

constexpr int64_t kChunk = 1024;

// exp for the softmax loops. float: Cephes-style range reduction and a degree-6 polynomial (about 1 ulp),
// branch-free so that -O3 vectorizes it (libm's expf is a scalar call here); arguments below -87.3, masked
// scores included, give exactly 0. double keeps libm's exp (the float64 path is for verification).
inline float fast_exp(float x) {
  const bool under = x < -87.3f;
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : y * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T> constexpr T masked_value() { return T(-1e30); }
template <> constexpr double masked_value<double>() { return -1e300; }

// Row-major C[M][N] = alpha * op(A) op(B) + beta * C, via column-major BLAS on the transposes.
template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', int(N), int(M), int(K), alpha, B, int(ldb), A, int(lda), beta, C, int(ldc));
}

struct Segment {   // a contiguous run of keys inside a chunk
  int64_t start;   // first key (token position)
  int64_t len;     // number of keys
  int64_t col;     // first column in the chunk's score buffer
};

struct Partial {   // a partial tile inside a chunk: where its element mask goes
  int64_t mask;    // index into part_mask
  int64_t col;     // first column in the chunk's score buffer
  int64_t len;     // keys in the tile
};

struct Chunk {
  std::vector<Segment> segs;
  std::vector<Partial> parts;
  int64_t width = 0;
};

// Cut the visited tiles of one query tile into chunks of <= kChunk keys. Keys outside [lo, hi), the union of
// the tile's row bounds, are masked for every row: tiles without an element mask are clipped to it, and tiles
// wholly outside it are dropped (a causal diagonal block costs about half).
std::vector<Chunk> make_chunks(const int64_t* tiles, const int64_t* pidx, int64_t V, const int64_t* kvb,
                               int64_t lo = 0, int64_t hi = std::numeric_limits<int64_t>::max()) {
  std::vector<Chunk> chunks;
  Chunk cur;
  for (int64_t j = 0; j < V; ++j) {
    const int64_t t = tiles[j];
    if (t < 0) break;
    int64_t s = kvb[t], len = kvb[t + 1] - kvb[t];
    TORCH_CHECK(len <= kChunk, "key tiles must hold at most ", kChunk, " keys, got ", len);
    if (s >= hi || s + len <= lo) continue;
    if (pidx[j] < 0) {
      const int64_t e = std::min(s + len, hi);
      s = std::max(s, lo);
      len = e - s;
    }
    if (cur.width > 0 && cur.width + len > kChunk) {
      chunks.push_back(std::move(cur));
      cur = Chunk();
    }
    if (!cur.segs.empty() && cur.segs.back().start + cur.segs.back().len == s) {
      cur.segs.back().len += len;
    } else {
      cur.segs.push_back({s, len, cur.width});
    }
    if (pidx[j] >= 0) cur.parts.push_back({pidx[j], cur.width, len});
    cur.width += len;
  }
  if (cur.width > 0) chunks.push_back(std::move(cur));
  return chunks;
}

template <typename T>
inline void apply_partial_masks(const Chunk& c, T* S, int64_t ld, int64_t rows, const bool* pmask, int64_t TQ,
                                int64_t TK) {
  for (const Partial& p : c.parts) {
    const bool* m = pmask + p.mask * TQ * TK;
    for (int64_t r = 0; r < rows; ++r) {
      T* srow = S + r * ld + p.col;
      const bool* mrow = m + r * TK;
      for (int64_t x = 0; x < p.len; ++x) srow[x] = mrow[x] ? srow[x] : masked_value<T>();
    }
  }
}

// S[rows][c.width] = scale * Q K^T over the chunk's keys, masked on its partial tiles.
template <typename T>
inline void chunk_scores(const Chunk& c, const T* Q, const T* K, int64_t rows, int64_t D, T scale, T* S,
                         const bool* pmask, int64_t TQ, int64_t TK, const int64_t* rbounds) {
  for (const Segment& s : c.segs)
    gemm_rm<T>(false, true, rows, s.len, D, scale, Q, D, K + s.start * D, D, T(0), S + s.col, c.width);
  apply_partial_masks<T>(c, S, c.width, rows, pmask, TQ, TK);
  if (rbounds == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {  // keep keys in [lo, hi) of this row
    const int64_t lo = rbounds[2 * r], hi = rbounds[2 * r + 1];
    T* srow = S + r * c.width;
    for (const Segment& s : c.segs) {
      if (s.start >= lo && s.start + s.len <= hi) continue;
      for (int64_t x = 0; x < s.len; ++x) {
        const int64_t key = s.start + x;
        srow[s.col + x] = (key >= lo && key < hi) ? srow[s.col + x] : masked_value<T>();
      }
    }
  }
}

// The union [lo, hi) of the row bounds of `rows` rows (everything when there are none).
inline std::pair<int64_t, int64_t> bounds_union(const int64_t* rbounds, int64_t rows) {
  if (rbounds == nullptr) return {0, std::numeric_limits<int64_t>::max()};
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (rbounds[2 * r] >= rbounds[2 * r + 1]) continue;  // a row that sees nothing
    lo = std::min(lo, rbounds[2 * r]);
    hi = std::max(hi, rbounds[2 * r + 1]);
  }
  return {std::min(lo, hi), hi};
}

// Rows r0 .. r0 + rows of a (batch, head)'s query rows: the rows themselves, or (q_index given: virtual rows)
// the rows q_index names, copied into buf. src: that (batch, head)'s [rows, F] matrix.
template <typename T>
inline const T* rows_at(const T* src, int64_t F, const int64_t* q_index, int64_t r0, int64_t rows, T* buf) {
  if (q_index == nullptr) return src + r0 * F;
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf + r * F, src + q_index[r0 + r] * F, F * sizeof(T));
  return buf;
}

// Where one (batch, head)'s schedule lives in the grouped tensors (group stride 0 when shared by all).
struct Groups {
  const int64_t* qb; const int64_t* tiles; const int64_t* pidx; const int64_t* rb;
  int64_t qb_stride, tiles_stride, rb_stride, nQT, V;
  Groups(const at::Tensor& q_bounds, const at::Tensor& kv_tiles, const at::Tensor& part_idx,
         const at::Tensor& row_bounds, int64_t Nq)
      : qb(q_bounds.data_ptr<int64_t>()), tiles(kv_tiles.data_ptr<int64_t>()), pidx(part_idx.data_ptr<int64_t>()),
        rb(row_bounds.numel() ? row_bounds.data_ptr<int64_t>() : nullptr), nQT(kv_tiles.size(1)), V(kv_tiles.size(2)) {
    qb_stride = q_bounds.size(0) > 1 ? nQT + 1 : 0;
    tiles_stride = kv_tiles.size(0) > 1 ? nQT * V : 0;
    rb_stride = (rb && row_bounds.size(0) > 1) ? Nq * 2 : 0;
  }
  const int64_t* bounds(int64_t bh) const { return qb + bh * qb_stride; }
  const int64_t* tiles_of(int64_t bh, int64_t qt) const { return tiles + bh * tiles_stride + qt * V; }
  const int64_t* pidx_of(int64_t bh, int64_t qt) const { return pidx + bh * tiles_stride + qt * V; }
  const int64_t* rows_of(int64_t bh, int64_t r0) const { return rb ? rb + bh * rb_stride + 2 * r0 : nullptr; }
  int64_t max_rows(int64_t BH) const {
    int64_t mr = 0;
    const int64_t G = qb_stride ? BH : 1;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < nQT; ++t) mr = std::max(mr, bounds(g)[t + 1] - bounds(g)[t]);
    return mr;
  }
};

// OpenMP's dynamic adjustment (which MKL switches on) shrinks a parallel region to fewer threads whenever the
// load average is high, so a 2-core machine running anything else gets one thread. The kernel asks for the
// threads torch is set to use (torch.set_num_threads) and restores the setting after.
struct FixedThreads {
  int dynamic = omp_get_dynamic();
  FixedThreads() { omp_set_dynamic(0); }
  ~FixedThreads() { omp_set_dynamic(dynamic); }
};

// Split [0, n) into one contiguous range per thread of a team of torch.get_num_threads() threads.
template <typename F>
void parallel_ranges(int64_t n, const F& f) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
  FixedThreads fixed;
#pragma omp parallel num_threads(nt)
  {
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t begin = n * tid / team, end = n * (tid + 1) / team;
    if (begin < end) f(begin, end);
  }
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Groups& g,
                  const at::Tensor& kv_bounds, const at::Tensor& part_mask, double scale, const int64_t* qi,
                  at::Tensor& out, at::Tensor& lse) {
  // qi: null, or q_index [B * H, Nv]: row r of (batch, head) bh is query qi[bh * Nv + r] (virtual rows)
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nv = out.size(2);
  const int64_t Hkv = k.size(1), Nk = k.size(2), Dv = v.size(3);
  const int64_t group = H / Hkv;
  const int64_t nQT = g.nQT;
  const int64_t TQ = part_mask.size(1), TK = part_mask.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const int64_t* kvb = kv_bounds.data_ptr<int64_t>();
  const bool* pmask = part_mask.data_ptr<bool>();
  const int64_t max_rows = g.max_rows(B * H);
  const T neg_inf = -std::numeric_limits<T>::infinity();

  parallel_ranges(B * H * nQT, [&](int64_t begin, int64_t end) {
    const int mkl_prev = MKL_Set_Num_Threads_Local(1);
    std::vector<T> S(max_rows * kChunk), acc(max_rows * Dv), m(max_rows), l(max_rows), qbuf(qi ? max_rows * D : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qt = item % nQT, bh = item / nQT, b = bh / H, h = bh % H;
      const int64_t* qb = g.bounds(bh);
      const int64_t r0 = qb[qt], rows = qb[qt + 1] - r0;
      if (rows == 0) continue;
      const int64_t* qi_bh = qi ? qi + bh * Nv : nullptr;
      const T* Q = rows_at(qp + bh * Nq * D, D, qi_bh, r0, rows, qbuf.data());
      const T* K = kp + (b * Hkv + h / group) * Nk * D;
      const T* Vv = vp + (b * Hkv + h / group) * Nk * Dv;
      std::fill(acc.begin(), acc.begin() + rows * Dv, T(0));
      std::fill(m.begin(), m.begin() + rows, masked_value<T>());
      std::fill(l.begin(), l.begin() + rows, T(0));
      const int64_t* rbounds = g.rows_of(bh, r0);
      const auto [klo, khi] = bounds_union(rbounds, rows);
      for (const Chunk& c : make_chunks(g.tiles_of(bh, qt), g.pidx_of(bh, qt), g.V, kvb, klo, khi)) {
        const int64_t W = c.width;
        chunk_scores<T>(c, Q, K, rows, D, T(scale), S.data(), pmask, TQ, TK, rbounds);
        for (int64_t r = 0; r < rows; ++r) {
          T* srow = S.data() + r * W;
          T mx = masked_value<T>();
          for (int64_t x = 0; x < W; ++x) mx = std::max(mx, srow[x]);
          const T m_new = std::max(m[r], mx);
          if (m_new <= masked_value<T>() / 2) {  // nothing visible yet in this row
            std::fill(srow, srow + W, T(0));
            continue;
          }
          const T alpha = fast_exp(m[r] - m_new);
          T sum = 0;
          for (int64_t x = 0; x < W; ++x) {
            const T e = fast_exp(srow[x] - m_new);
            srow[x] = e;
            sum += e;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != T(1)) {
            T* arow = acc.data() + r * Dv;
            for (int64_t x = 0; x < Dv; ++x) arow[x] *= alpha;
          }
        }
        for (const Segment& s : c.segs)
          gemm_rm<T>(false, false, rows, Dv, s.len, T(1), S.data() + s.col, W, Vv + s.start * Dv, Dv, T(1), acc.data(), Dv);
      }
      T* O = op + (bh * Nv + r0) * Dv;
      T* L = lp + bh * Nv + r0;
      for (int64_t r = 0; r < rows; ++r) {
        const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
        for (int64_t x = 0; x < Dv; ++x) O[r * Dv + x] = acc[r * Dv + x] * inv;
        L[r] = l[r] > T(0) ? m[r] + std::log(l[r]) : neg_inf;
      }
    }
    MKL_Set_Num_Threads_Local(mkl_prev);
  });
}

template <typename T>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                   const at::Tensor& lse, const at::Tensor& delta, const Groups& g,
                   const at::Tensor& kv_bounds, const at::Tensor& part_mask, double scale, const int64_t* qi,
                   at::Tensor& dq, at::Tensor& dk_all, at::Tensor& dv_all) {
  // dk_all / dv_all: [threads, B, Hkv, Nk, D or Dv], one private accumulator per thread, summed by the caller.
  // qi as in forward_impl: q, dout, lse and delta are per query, dq [B, H, Nv, D] per virtual row.
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nv = dq.size(2);
  const int64_t Hkv = k.size(1), Nk = k.size(2), Dv = v.size(3);
  const int64_t group = H / Hkv;
  const int64_t nQT = g.nQT;
  const int64_t TQ = part_mask.size(1), TK = part_mask.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  const T* dlp = delta.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk_all.data_ptr<T>();
  T* dvp = dv_all.data_ptr<T>();
  const int64_t* kvb = kv_bounds.data_ptr<int64_t>();
  const bool* pmask = part_mask.data_ptr<bool>();
  const int64_t n_slots = dk_all.size(0);
  const int64_t dk_slot = B * Hkv * Nk * D, dv_slot = B * Hkv * Nk * Dv;
  const int64_t max_rows = g.max_rows(B * H);

  // Static split into n_slots contiguous ranges, one accumulator each (no races on dk/dv).
  const int64_t total = B * H * nQT;
  parallel_ranges(n_slots, [&](int64_t sbegin, int64_t send) {
    const int mkl_prev = MKL_Set_Num_Threads_Local(1);
    std::vector<T> P(max_rows * kChunk), dP(max_rows * kChunk);
    std::vector<T> qbuf(qi ? max_rows * D : 0), dobuf(qi ? max_rows * Dv : 0), lbuf(qi ? max_rows : 0),
        dlbuf(qi ? max_rows : 0);
    for (int64_t slot = sbegin; slot < send; ++slot) {
      T* DK = dkp + slot * dk_slot;
      T* DV = dvp + slot * dv_slot;
      const int64_t ibeg = total * slot / n_slots, iend = total * (slot + 1) / n_slots;
      for (int64_t item = ibeg; item < iend; ++item) {
        const int64_t qt = item % nQT, bh = item / nQT, b = bh / H, h = bh % H;
        const int64_t* qb = g.bounds(bh);
        const int64_t r0 = qb[qt], rows = qb[qt + 1] - r0;
        if (rows == 0) continue;
        const int64_t kvh = b * Hkv + h / group;
        const int64_t* qi_bh = qi ? qi + bh * Nv : nullptr;
        const T* Q = rows_at(qp + bh * Nq * D, D, qi_bh, r0, rows, qbuf.data());
        const T* dO = rows_at(dop + bh * Nq * Dv, Dv, qi_bh, r0, rows, dobuf.data());
        const T* L = rows_at(lp + bh * Nq, int64_t(1), qi_bh, r0, rows, lbuf.data());
        const T* Dl = rows_at(dlp + bh * Nq, int64_t(1), qi_bh, r0, rows, dlbuf.data());
        T* dQ = dqp + (bh * Nv + r0) * D;
        const T* K = kp + kvh * Nk * D;
        const T* Vv = vp + kvh * Nk * Dv;
        T* dK = DK + kvh * Nk * D;
        T* dV = DV + kvh * Nk * Dv;
        const int64_t* rbounds = g.rows_of(bh, r0);
        const auto [klo, khi] = bounds_union(rbounds, rows);
        for (const Chunk& c : make_chunks(g.tiles_of(bh, qt), g.pidx_of(bh, qt), g.V, kvb, klo, khi)) {
          const int64_t W = c.width;
          chunk_scores<T>(c, Q, K, rows, D, T(scale), P.data(), pmask, TQ, TK, rbounds);
          for (int64_t r = 0; r < rows; ++r) {
            T* prow = P.data() + r * W;
            const T lr = L[r];
            if (!(lr > masked_value<T>() / 2)) {  // row with no visible key (lse = -inf)
              std::fill(prow, prow + W, T(0));
              continue;
            }
            for (int64_t x = 0; x < W; ++x) prow[x] = fast_exp(prow[x] - lr);
          }
          for (const Segment& s : c.segs) {
            // dV += P^T dO ; dP = dO V^T
            gemm_rm<T>(true, false, s.len, Dv, rows, T(1), P.data() + s.col, W, dO, Dv, T(1), dV + s.start * Dv, Dv);
            gemm_rm<T>(false, true, rows, s.len, Dv, T(1), dO, Dv, Vv + s.start * Dv, Dv, T(0), dP.data() + s.col, W);
          }
          for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta), stored in dP
            T* prow = P.data() + r * W;
            T* drow = dP.data() + r * W;
            const T dl = Dl[r];
            for (int64_t x = 0; x < W; ++x) drow[x] = prow[x] * (drow[x] - dl);
          }
          for (const Segment& s : c.segs) {
            // dQ += scale dS K ; dK += scale dS^T Q
            gemm_rm<T>(false, false, rows, D, s.len, T(scale), dP.data() + s.col, W, K + s.start * D, D, T(1), dQ, D);
            gemm_rm<T>(true, false, s.len, D, rows, T(scale), dP.data() + s.col, W, Q, D, T(1), dK + s.start * D, D);
          }
        }
      }
    }
    MKL_Set_Num_Threads_Local(mkl_prev);
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_bounds,
                  const at::Tensor& kv_bounds, const at::Tensor& kv_tiles, const at::Tensor& part_idx,
                  const at::Tensor& part_mask, const at::Tensor& row_bounds, const at::Tensor& q_index) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtype mismatch");
  TORCH_CHECK(q_bounds.scalar_type() == at::kLong && kv_bounds.scalar_type() == at::kLong, "bounds must be int64");
  TORCH_CHECK(kv_tiles.scalar_type() == at::kLong && part_idx.scalar_type() == at::kLong, "tiles must be int64");
  TORCH_CHECK(part_mask.scalar_type() == at::kBool && part_mask.dim() == 3 && part_mask.is_contiguous(), "bad part_mask");
  TORCH_CHECK(kv_tiles.dim() == 3 && kv_tiles.is_contiguous() && part_idx.is_contiguous() &&
              kv_tiles.sizes() == part_idx.sizes(), "bad tiles");
  TORCH_CHECK(q_bounds.dim() == 2 && q_bounds.is_contiguous() && q_bounds.size(1) == kv_tiles.size(1) + 1, "bad q_bounds");
  const int64_t BH = q.size(0) * q.size(1);
  TORCH_CHECK(q_bounds.size(0) == 1 || q_bounds.size(0) == BH, "q_bounds groups must be 1 or B * H");
  TORCH_CHECK(kv_tiles.size(0) == 1 || kv_tiles.size(0) == BH, "kv_tiles groups must be 1 or B * H");
  const int64_t rows = q_index.numel() ? q_index.size(1) : q.size(2);  // rows of the schedule (virtual rows)
  if (q_index.numel()) {
    TORCH_CHECK(q_index.scalar_type() == at::kLong && q_index.dim() == 2 && q_index.is_contiguous() &&
                q_index.size(0) == BH, "q_index must be a contiguous int64 [B * H, Nv]");
    TORCH_CHECK(q_index.min().item<int64_t>() >= 0 && q_index.max().item<int64_t>() < q.size(2),
                "q_index values must be in [0, Nq)");
  }
  if (row_bounds.numel()) {
    TORCH_CHECK(row_bounds.scalar_type() == at::kLong && row_bounds.dim() == 3 && row_bounds.is_contiguous() &&
                row_bounds.size(1) == rows && row_bounds.size(2) == 2, "bad row_bounds");
    TORCH_CHECK(row_bounds.size(0) == 1 || row_bounds.size(0) == BH, "row_bounds groups must be 1 or B * H");
  }
}

// q_index (empty: none) [B * H, Nv]: the schedule's rows are virtual rows, row r of (batch, head) bh reading
// query q_index[bh, r]; out and lse then hold Nv rows.
std::vector<at::Tensor> forward_grouped(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_bounds,
                                        at::Tensor kv_bounds, at::Tensor kv_tiles, at::Tensor part_idx,
                                        at::Tensor part_mask, at::Tensor row_bounds, double scale,
                                        at::Tensor q_index) {
  check_inputs(q, k, v, q_bounds, kv_bounds, kv_tiles, part_idx, part_mask, row_bounds, q_index);
  const int64_t rows = q_index.numel() ? q_index.size(1) : q.size(2);
  const Groups g(q_bounds, kv_tiles, part_idx, row_bounds, rows);
  // Every row inside a schedule's tiles is written by the kernel; only the rows outside them are filled here
  // (a large zero-filled buffer costs as much as the merge).
  auto out = at::empty({q.size(0), q.size(1), rows, v.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), rows}, q.options());
  const int64_t BH = q.size(0) * q.size(1);
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t* qb = g.bounds(bh);
    for (const auto& [r0, r1] : {std::pair<int64_t, int64_t>{0, qb[0]}, {qb[g.nQT], rows}}) {
      if (r0 >= r1) continue;
      out[bh / q.size(1)][bh % q.size(1)].narrow(0, r0, r1 - r0).zero_();
      lse[bh / q.size(1)][bh % q.size(1)].narrow(0, r0, r1 - r0).fill_(-std::numeric_limits<double>::infinity());
    }
  }
  const int64_t* qi = q_index.numel() ? q_index.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "blocksparse_forward", [&] {
    forward_impl<scalar_t>(q, k, v, g, kv_bounds, part_mask, scale, qi, out, lse);
  });
  return {out, lse};
}

std::vector<at::Tensor> backward_grouped(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor dout, at::Tensor lse,
                                         at::Tensor delta, at::Tensor q_bounds, at::Tensor kv_bounds,
                                         at::Tensor kv_tiles, at::Tensor part_idx, at::Tensor part_mask,
                                         at::Tensor row_bounds, double scale, at::Tensor q_index) {
  check_inputs(q, k, v, q_bounds, kv_bounds, kv_tiles, part_idx, part_mask, row_bounds, q_index);
  TORCH_CHECK(dout.is_contiguous() && lse.is_contiguous() && delta.is_contiguous(), "dout, lse, delta must be contiguous");
  const int64_t rows = q_index.numel() ? q_index.size(1) : q.size(2);
  const Groups g(q_bounds, kv_tiles, part_idx, row_bounds, rows);
  const int64_t slots = std::max<int64_t>(1, at::get_num_threads());
  auto dq = at::zeros({q.size(0), q.size(1), rows, q.size(3)}, q.options());
  const int64_t* qi = q_index.numel() ? q_index.data_ptr<int64_t>() : nullptr;
  auto dk_all = at::zeros({slots, k.size(0), k.size(1), k.size(2), k.size(3)}, k.options());
  auto dv_all = at::zeros({slots, v.size(0), v.size(1), v.size(2), v.size(3)}, v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "blocksparse_backward", [&] {
    backward_impl<scalar_t>(q, k, v, dout, lse, delta, g, kv_bounds, part_mask, scale, qi, dq, dk_all, dv_all);
  });
  return {dq, dk_all.sum(0), dv_all.sum(0)};
}

// One static schedule for every (batch, head): q_bounds [nQT + 1], kv_tiles / part_idx [nQT, V].
std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor q_bounds, at::Tensor kv_bounds,
                                at::Tensor kv_tiles, at::Tensor part_idx, at::Tensor part_mask, double scale) {
  return forward_grouped(q, k, v, q_bounds.unsqueeze(0), kv_bounds, kv_tiles.unsqueeze(0), part_idx.unsqueeze(0),
                         part_mask, at::empty({0}, q_bounds.options()), scale, at::empty({0}, q_bounds.options()));
}

std::vector<at::Tensor> backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor dout, at::Tensor lse,
                                 at::Tensor delta, at::Tensor q_bounds, at::Tensor kv_bounds, at::Tensor kv_tiles,
                                 at::Tensor part_idx, at::Tensor part_mask, double scale) {
  return backward_grouped(q, k, v, dout, lse, delta, q_bounds.unsqueeze(0), kv_bounds, kv_tiles.unsqueeze(0),
                          part_idx.unsqueeze(0), part_mask, at::empty({0}, q_bounds.options()), scale,
                          at::empty({0}, q_bounds.options()));
}

// Per query, combine its virtual rows: slots [B, H, N, S] name them (a padding slot names a row with lse -inf).
// With lse_v: the log-sum-exp merge of partial softmaxes, out = sum_s exp(lse_s - lse) x_s and
// lse = log sum_s exp(lse_s) (-inf and a zero row where nothing was visible). Without (empty): the plain sum
// (the backward's dq), lse undefined.
template <typename T>
void merge_impl(const at::Tensor& xv, const at::Tensor& lse_v, const at::Tensor& slots, at::Tensor& out,
                at::Tensor& lse) {
  const int64_t BH = xv.size(0) * xv.size(1), Nv = xv.size(2), F = xv.size(3);
  const int64_t N = slots.size(2), S = slots.size(3);
  const T* xp = xv.data_ptr<T>();
  const T* lv = lse_v.numel() ? lse_v.data_ptr<T>() : nullptr;
  const int64_t* sp = slots.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  T* lp = lv ? lse.data_ptr<T>() : nullptr;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  parallel_ranges(BH * N, [&](int64_t begin, int64_t end) {
    std::vector<T> w(S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / N;
      const int64_t* sl = sp + item * S;
      const T* X = xp + bh * Nv * F;
      T* O = op + item * F;
      std::fill(O, O + F, T(0));
      if (lv == nullptr) {
        for (int64_t s = 0; s < S; ++s) {
          const T* x = X + sl[s] * F;
          for (int64_t f = 0; f < F; ++f) O[f] += x[f];
        }
        continue;
      }
      T mx = neg_inf;
      for (int64_t s = 0; s < S; ++s) mx = std::max(mx, lv[bh * Nv + sl[s]]);
      if (mx == neg_inf) {
        lp[item] = neg_inf;
        continue;
      }
      T total = 0;
      for (int64_t s = 0; s < S; ++s) total += (w[s] = std::exp(lv[bh * Nv + sl[s]] - mx));
      for (int64_t s = 0; s < S; ++s) {
        const T ws = w[s] / total;
        if (ws == T(0)) continue;
        const T* x = X + sl[s] * F;
        for (int64_t f = 0; f < F; ++f) O[f] += ws * x[f];
      }
      lp[item] = mx + std::log(total);
    }
  });
}

std::vector<at::Tensor> merge_rows(at::Tensor xv, at::Tensor lse_v, at::Tensor slots) {
  TORCH_CHECK(xv.dim() == 4 && xv.is_contiguous(), "xv must be a contiguous [B, H, Nv, F]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 4 && slots.is_contiguous() &&
              slots.size(0) == xv.size(0) && slots.size(1) == xv.size(1), "slots must be a contiguous int64 [B, H, N, S]");
  TORCH_CHECK(slots.numel() == 0 || (slots.min().item<int64_t>() >= 0 && slots.max().item<int64_t>() < xv.size(2)),
              "slots values must be in [0, Nv)");
  if (lse_v.numel())
    TORCH_CHECK(lse_v.is_contiguous() && lse_v.scalar_type() == xv.scalar_type() && lse_v.dim() == 3 &&
                lse_v.size(2) == xv.size(2), "lse_v must be a contiguous [B, H, Nv] of xv's dtype");
  auto out = at::empty({xv.size(0), xv.size(1), slots.size(2), xv.size(3)}, xv.options());
  auto lse = lse_v.numel() ? at::empty({xv.size(0), xv.size(1), slots.size(2)}, xv.options()) : at::empty({0}, xv.options());
  AT_DISPATCH_FLOATING_TYPES(xv.scalar_type(), "blocksparse_merge", [&] { merge_impl<scalar_t>(xv, lse_v, slots, out, lse); });
  return {out, lse};
}

// The row-major schedule of a per-query block selection (MoBA-style): table bool [G, nKB, N], query n of
// group g visits key block b. Every selected (query, block) pair becomes a virtual row; a group's rows are
// ordered by (block, query) and cut into tiles of <= rows_per_tile rows against one block's `pieces` key
// tiles (ids b * pieces + p). Returns
//   q_bounds [G, nQT + 1], kv_tiles [G, nQT, pieces] (groups with fewer tiles pad with empty ones),
//   row_bounds [G, Nv, 2]: [0, M), or causal [0, clamp(n + offset + 1, 0, M)),
//   vq [G, Nv]: the query of every virtual row, and slots [G, N, S]: the virtual rows of every query in
//   ascending block order, S the most blocks one query selected.
// Nv is the largest group's row count plus one: that last row is padding (sees no key; out 0, lse -inf) and
// fills the unused slots.
std::vector<at::Tensor> row_major_schedule(at::Tensor table, int64_t rows_per_tile, int64_t pieces, int64_t M,
                                           bool causal, int64_t offset) {
  TORCH_CHECK(table.scalar_type() == at::kBool && table.dim() == 3 && table.is_contiguous(),
              "table must be a contiguous bool [G, nKB, N]");
  TORCH_CHECK(rows_per_tile > 0 && pieces > 0, "rows_per_tile and pieces must be positive");
  const int64_t G = table.size(0), nKB = table.size(1), N = table.size(2);
  const bool* tp = table.data_ptr<bool>();
  std::vector<int64_t> rows(G, 0), tiles(G, 0), smax(G, 0), per_block(G * nKB, 0);
  parallel_ranges(G, [&](int64_t begin, int64_t end) {  // pass 1: sizes
    std::vector<int64_t> per_query(N);
    for (int64_t g = begin; g < end; ++g) {
      std::fill(per_query.begin(), per_query.end(), 0);
      for (int64_t b = 0; b < nKB; ++b) {
        const bool* row = tp + (g * nKB + b) * N;
        int64_t c = 0;
        for (int64_t n = 0; n < N; ++n) {
          c += row[n];
          per_query[n] += row[n];
        }
        per_block[g * nKB + b] = c;
        rows[g] += c;
        tiles[g] += (c + rows_per_tile - 1) / rows_per_tile;
      }
      smax[g] = N ? *std::max_element(per_query.begin(), per_query.end()) : 0;
    }
  });
  const int64_t Nv = *std::max_element(rows.begin(), rows.end()) + 1;
  const int64_t nQT = std::max<int64_t>(1, *std::max_element(tiles.begin(), tiles.end()));
  const int64_t S = std::max<int64_t>(1, *std::max_element(smax.begin(), smax.end()));
  const auto opts = at::TensorOptions().dtype(at::kLong);
  auto q_bounds = at::empty({G, nQT + 1}, opts);
  auto kv_tiles = at::full({G, nQT, pieces}, -1, opts);
  auto row_bounds = at::zeros({G, Nv, 2}, opts);
  auto vq = at::zeros({G, Nv}, opts);
  auto slots = at::full({G, N, S}, Nv - 1, opts);
  int64_t* qbp = q_bounds.data_ptr<int64_t>();
  int64_t* ktp = kv_tiles.data_ptr<int64_t>();
  int64_t* rbp = row_bounds.data_ptr<int64_t>();
  int64_t* vqp = vq.data_ptr<int64_t>();
  int64_t* slp = slots.data_ptr<int64_t>();
  parallel_ranges(G, [&](int64_t begin, int64_t end) {  // pass 2: fill
    std::vector<int64_t> filled(N);
    for (int64_t g = begin; g < end; ++g) {
      std::fill(filled.begin(), filled.end(), 0);
      int64_t r = 0, t = 0;
      int64_t* qb = qbp + g * (nQT + 1);
      for (int64_t b = 0; b < nKB; ++b) {
        const bool* row = tp + (g * nKB + b) * N;
        const int64_t first = r;
        for (int64_t n = 0; n < N; ++n) {
          if (!row[n]) continue;
          vqp[g * Nv + r] = n;
          rbp[(g * Nv + r) * 2 + 1] = causal ? std::clamp<int64_t>(n + offset + 1, 0, M) : M;
          slp[(g * N + n) * S + filled[n]++] = r;
          ++r;
        }
        for (int64_t s0 = first; s0 < r; s0 += rows_per_tile, ++t) {
          qb[t] = s0;
          for (int64_t p = 0; p < pieces; ++p) ktp[(g * nQT + t) * pieces + p] = b * pieces + p;
        }
      }
      for (; t <= nQT; ++t) qb[t] = r;  // the end of the last tile, then empty padding tiles
    }
  });
  return {q_bounds, kv_tiles, row_bounds, vq, slots};
}

// Selection helper for Dynamic Mask Attention: rank [G, N] int64 (a permutation of 0 .. N - 1 per group, 0 =
// best key) -> (threshold [G, N], prefix_rank [G, ceil(N / block), window]). threshold[i] is the window-th smallest
// rank among keys 0 .. i (N while i + 1 < window: everything): causal DMA keeps key j for query i iff j <= i and
// rank[j] <= threshold[i]. prefix_rank[c] lists the ranks of the window best keys before c * block, ascending,
// padded with N. One pass with a max-heap of the window best: O(N log window + blocks window log window).
std::vector<at::Tensor> dma_select(at::Tensor rank, int64_t window, int64_t block) {
  TORCH_CHECK(rank.scalar_type() == at::kLong && rank.dim() == 2 && rank.is_contiguous(),
              "rank must be a contiguous int64 [G, N]");
  TORCH_CHECK(window > 0 && block > 0, "window and block must be positive");
  const int64_t G = rank.size(0), N = rank.size(1), nb = (N + block - 1) / block;
  auto threshold = at::empty_like(rank);
  auto prefix = at::full({G, nb, window}, N, rank.options());
  const int64_t* rp = rank.data_ptr<int64_t>();
  int64_t* tp = threshold.data_ptr<int64_t>();
  int64_t* pp = prefix.data_ptr<int64_t>();
  parallel_ranges(G, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> heap, sorted;
    heap.reserve(window + 1);
    for (int64_t g = begin; g < end; ++g) {
      heap.clear();
      for (int64_t i = 0; i < N; ++i) {
        if (i % block == 0) {  // the window best keys before this block, ascending
          sorted.assign(heap.begin(), heap.end());
          std::sort(sorted.begin(), sorted.end());
          std::copy(sorted.begin(), sorted.end(), pp + (g * nb + i / block) * window);
        }
        const int64_t r = rp[g * N + i];
        if (int64_t(heap.size()) < window) {
          heap.push_back(r);
          std::push_heap(heap.begin(), heap.end());
        } else if (r < heap.front()) {
          std::pop_heap(heap.begin(), heap.end());
          heap.back() = r;
          std::push_heap(heap.begin(), heap.end());
        }
        tp[g * N + i] = int64_t(heap.size()) < window ? N : heap.front();
      }
    }
  });
  return {threshold, prefix};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_omp_dynamic", [](bool on) { omp_set_dynamic(on ? 1 : 0); },
        "OpenMP dynamic thread adjustment of the calling thread (benchmarks switch it off for every op)");
  m.def("forward", &forward, "block-sparse attention forward: (out, lse)");
  m.def("backward", &backward, "block-sparse attention backward: (dq, dk, dv)");
  m.def("forward_grouped", &forward_grouped, "forward with per-(batch, head) schedules and row bounds: (out, lse)");
  m.def("backward_grouped", &backward_grouped, "backward with per-(batch, head) schedules and row bounds");
  m.def("row_major_schedule", &row_major_schedule, "virtual-row schedule of a per-query block selection");
  m.def("dma_select", &dma_select, "causal DMA: per-query rank thresholds and per-block best-key prefixes");
  m.def("merge_rows", &merge_rows, "per query: lse merge (or plain sum) of its virtual rows: (out, lse)");
}
