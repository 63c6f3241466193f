// BatchNorm (training mode) + ReLU + 2x2 max pooling, forward and backward,
// as XLA FFI custom calls for the CPU. Built and registered by
// dselect_jax/cpu/kernels.py, which chains them into a custom VJP.
//
// Shape legend: N images, H rows, W columns, C channels (x is (N, H, W, C),
// float32, row-major, H and W even); L = W * C, one image row; P = N * H * W.
//
// Why: XLA:CPU spends about 14 passes over the (N, H, W, C) map on this block
// in a training step (statistics, normalization, pooling, its tie mask, and
// the backward's reductions). These kernels make 5: two reads forward
// (statistics; normalize, ReLU and pool in one), and backward one read for
// the two per-channel sums and one read plus one write for dx.
//
// Every loop below runs along one image row of L contiguous floats, with the
// per-channel values repeated to length L, so that the compiler vectorizes
// it whatever C is. The images are cut into chunks of kChunk, which XLA's
// CPU thread pool runs in parallel; per-channel sums are kept per chunk and
// added in chunk order, so the result does not depend on the threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dselect_cpu::NumChunks;
using dselect_cpu::ParallelFor;

using Map = ffi::BufferR4<ffi::F32>;  // (N, H, W, C), or the pooled map.
using Vec = ffi::BufferR1<ffi::F32>;  // (C,)
using Mat = ffi::BufferR2<ffi::F32>;  // (2, C)

constexpr int64_t kChunk = 8;  // Images per parallel task.

int64_t NumChunks(int64_t n) { return NumChunks(n, kChunk); }

// v[j] = per_channel[j % c] for j < l.
std::vector<float> Repeat(const float* per_channel, int64_t c, int64_t l) {
  std::vector<float> v(l);
  for (int64_t j = 0; j < l; ++j) v[j] = per_channel[j % c];
  return v;
}

// Adds the per-chunk sums (n_chunks, 2, C) in chunk order into out (2, C).
void ReduceChunks(const std::vector<double>& part, int64_t n_chunks, int64_t c,
                  float* out) {
  for (int64_t k = 0; k < 2 * c; ++k) {
    double total = 0.0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) total += part[ch * 2 * c + k];
    out[k] = static_cast<float>(total);
  }
}

// Per-channel sum and sum of squares of x over N, H, W: out (2, C). Summed in
// float within an image (H terms per lane), in double across images.
ffi::Error StatsImpl(ffi::ThreadPool pool, Map x, ffi::Result<Mat> out) {
  const auto d = x.dimensions();
  const int64_t n = d[0], h = d[1], c = d[3], l = d[2] * c;
  const float* px = x.typed_data();
  const int64_t n_chunks = NumChunks(n);
  std::vector<double> part(n_chunks * 2 * c, 0.0);
  ParallelFor(pool, n_chunks, [&](int64_t ch) {
    double* sum = part.data() + ch * 2 * c;
    double* sq = sum + c;
    std::vector<float> row_sum(l), row_sq(l);
    for (int64_t i = ch * kChunk; i < std::min(n, (ch + 1) * kChunk); ++i) {
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(row_sq.begin(), row_sq.end(), 0.f);
      for (int64_t r = 0; r < h; ++r) {
        const float* row = px + (i * h + r) * l;
        for (int64_t j = 0; j < l; ++j) {
          row_sum[j] += row[j];
          row_sq[j] += row[j] * row[j];
        }
      }
      for (int64_t j = 0; j < l; ++j) {
        sum[j % c] += row_sum[j];
        sq[j % c] += row_sq[j];
      }
    }
  });
  ReduceChunks(part, n_chunks, c, out->typed_data());
  return ffi::Error::Success();
}

// y = maxpool2x2(relu(a * x + b)), a and b per channel: y (N, H/2, W/2, C).
ffi::Error ForwardImpl(ffi::ThreadPool pool, Map x, Vec a, Vec b,
                       ffi::Result<Map> y) {
  const auto d = x.dimensions();
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3], l = w * c;
  const std::vector<float> ar = Repeat(a.typed_data(), c, l);
  const std::vector<float> br = Repeat(b.typed_data(), c, l);
  const float* px = x.typed_data();
  float* py = y->typed_data();
  ParallelFor(pool, NumChunks(n), [&](int64_t ch) {
    std::vector<float> m(l);
    const int64_t rows_end = std::min(n, (ch + 1) * kChunk) * (h / 2);
    for (int64_t i = ch * kChunk * (h / 2); i < rows_end; ++i) {  // Pooled rows.
      const float* r0 = px + 2 * i * l;
      const float* r1 = r0 + l;
      for (int64_t j = 0; j < l; ++j)
        m[j] = std::max(ar[j] * r0[j] + br[j], ar[j] * r1[j] + br[j]);
      float* out = py + i * (w / 2) * c;
      for (int64_t p = 0; p < w / 2; ++p)
        for (int64_t k = 0; k < c; ++k)
          out[p * c + k] = std::max(
              std::max(m[2 * p * c + k], m[(2 * p + 1) * c + k]), 0.f);
    }
  });
  return ffi::Error::Success();
}

// The row loops, with restrict pointers so that the compiler vectorizes them.
// z0 = a r0 + b, z1 = a r1 + b, m = max(z0, z1) on one row pair.
inline void RowZ(int64_t l, const float* __restrict__ a,
                 const float* __restrict__ b, const float* __restrict__ r0,
                 const float* __restrict__ r1, float* __restrict__ z0,
                 float* __restrict__ z1, float* __restrict__ m) {
  for (int64_t j = 0; j < l; ++j) {
    z0[j] = a[j] * r0[j] + b[j];
    z1[j] = a[j] * r1[j] + b[j];
    m[j] = std::max(z0[j], z1[j]);
  }
}

// One row's g (share where z is its window's max) into the sums of g and
// g * xhat.
inline void RowSums(int64_t l, const float* __restrict__ mean,
                    const float* __restrict__ rstd, const float* __restrict__ x,
                    const float* __restrict__ z, const float* __restrict__ wmax,
                    const float* __restrict__ share, float* __restrict__ t1,
                    float* __restrict__ t2) {
  for (int64_t j = 0; j < l; ++j) {
    const float g = z[j] == wmax[j] ? share[j] : 0.f;
    t1[j] += g;
    t2[j] += g * ((x[j] - mean[j]) * rstd[j]);
  }
}

// One row's dx = a g + k0 + xhat k1.
inline void RowDx(int64_t l, const float* __restrict__ a,
                  const float* __restrict__ k0, const float* __restrict__ k1,
                  const float* __restrict__ mean,
                  const float* __restrict__ rstd, const float* __restrict__ x,
                  const float* __restrict__ z, const float* __restrict__ wmax,
                  const float* __restrict__ share, float* __restrict__ dx) {
  for (int64_t j = 0; j < l; ++j) {
    const float g = z[j] == wmax[j] ? share[j] : 0.f;
    dx[j] = a[j] * g + k0[j] + ((x[j] - mean[j]) * rstd[j]) * k1[j];
  }
}

// Where each element of an image row (L = W * C) sits in its 2-wide pooling
// window: odd[j] is 1 in the window's second column (its mate is j - C),
// 0 in its first (mate j + C); source[j] is its window's element in the
// pooled row (W / 2 * C).
struct Layout {
  std::vector<float> odd;
  std::vector<int32_t> source;
};

Layout WindowLayout(int64_t w, int64_t c) {
  Layout layout{std::vector<float>(w * c), std::vector<int32_t>(w * c)};
  for (int64_t j = 0; j < w * c; ++j) {
    layout.odd[j] = static_cast<float>((j / c) % 2);
    layout.source[j] = static_cast<int32_t>((j / (2 * c)) * c + j % c);
  }
  return layout;
}

// out[j] = v[j] and its window mate's value, added (kSum) or their max.
// v must be readable from v - c to v + l + c; both mates are read and one
// kept, so the loop vectorizes.
template <bool kSum>
inline void Mates(int64_t l, int64_t c, const float* __restrict__ odd,
                  const float* __restrict__ v, float* __restrict__ out) {
  for (int64_t j = 0; j < l; ++j) {
    const float before = v[j - c], after = v[j + c];
    const float mate = odd[j] != 0.f ? before : after;
    out[j] = kSum ? v[j] + mate : std::max(v[j], mate);
  }
}

// out[j] = pooled[source[j]]: a pooled row's values on the full row.
inline void Upsample(int64_t l, const int32_t* __restrict__ source,
                     const float* __restrict__ pooled,
                     float* __restrict__ out) {
  for (int64_t j = 0; j < l; ++j) out[j] = pooled[source[j]];
}

// The backward of images [i0, i1), one pass over them: kSums adds the
// per-channel sums of g and g * xhat into s (2, C), where g = dL/dz for
// z = a x + b and xhat = (x - mean) * rstd; otherwise it writes
// dx = a g + k0 + xhat k1 with per-channel k0, k1 (kernels.py derives
// them from the sums).
//
// g is dy routed back through the pooling and the ReLU: a window's dy goes
// in equal parts to the elements equal to its maximum (JAX's gradient of
// max splits ties so), and nowhere if that maximum is <= 0 (ReLU's gradient
// is 0 at and below 0). z is recomputed here exactly as the forward did.
struct BackwardArgs {
  const float *x, *a, *b, *mean, *rstd, *dy, *k;  // k: (2, C), or null.
  int64_t h, w, c;
};

template <bool kSums>
void Backward(const BackwardArgs& args, int64_t i0, int64_t i1, double* s,
              float* pdx) {
  const int64_t h = args.h, c = args.c, l = args.w * c, wo = args.w / 2;
  const std::vector<float> ar = Repeat(args.a, c, l), br = Repeat(args.b, c, l);
  const std::vector<float> mr = Repeat(args.mean, c, l);
  const std::vector<float> rr = Repeat(args.rstd, c, l);
  std::vector<float> k0(l), k1(l);
  if (!kSums) k0 = Repeat(args.k, c, l), k1 = Repeat(args.k + c, c, l);
  // z of the two rows of a window row; the window's max, count of maxima and
  // share of dy, each repeated on the window's four positions. The rows'
  // max and count are padded by c floats on both sides, so that Mates may
  // read past either end.
  std::vector<float> z0(l), z1(l), wmax(l), count(l), share(l);
  std::vector<float> vmax_padded(l + 2 * c, 0.f), cnt_padded(l + 2 * c, 0.f);
  float* vmax = vmax_padded.data() + c;
  float* cnt = cnt_padded.data() + c;
  const Layout layout = WindowLayout(args.w, c);
  std::vector<float> t1(l), t2(l);  // An image's partial sums.
  for (int64_t i = i0; i < i1; ++i) {
    std::fill(t1.begin(), t1.end(), 0.f);
    std::fill(t2.begin(), t2.end(), 0.f);
    for (int64_t rp = 0; rp < h / 2; ++rp) {
      const float* r0 = args.x + (i * h + 2 * rp) * l;
      const float* r1 = r0 + l;
      const float* dy = args.dy + (i * (h / 2) + rp) * wo * c;
      RowZ(l, ar.data(), br.data(), r0, r1, z0.data(), z1.data(), vmax);
      Mates<false>(l, c, layout.odd.data(), vmax, wmax.data());
      Upsample(l, layout.source.data(), dy, share.data());
      for (int64_t j = 0; j < l; ++j)
        cnt[j] = static_cast<float>(z0[j] == wmax[j]) +
                 static_cast<float>(z1[j] == wmax[j]);
      Mates<true>(l, c, layout.odd.data(), cnt, count.data());
      // count >= 1: the max is one of the window's values.
      for (int64_t j = 0; j < l; ++j)
        share[j] = (wmax[j] > 0.f ? share[j] : 0.f) / count[j];
      for (const auto& [r, z] : {std::pair{r0, z0.data()}, {r1, z1.data()}}) {
        if (kSums) {
          RowSums(l, mr.data(), rr.data(), r, z, wmax.data(), share.data(),
                  t1.data(), t2.data());
        } else {
          float* out = pdx + (r - args.x);
          RowDx(l, ar.data(), k0.data(), k1.data(), mr.data(), rr.data(), r, z,
                wmax.data(), share.data(), out);
        }
      }
    }
    if (kSums) {
      for (int64_t j = 0; j < l; ++j) {
        s[j % c] += t1[j];
        s[c + j % c] += t2[j];
      }
    }
  }
}

// Per-channel sums of g and g * xhat: out (2, C).
ffi::Error BackwardSumsImpl(ffi::ThreadPool pool, Map x, Vec a, Vec b,
                            Vec mean, Vec rstd, Map dy, ffi::Result<Mat> out) {
  const auto d = x.dimensions();
  const int64_t n = d[0], c = d[3], n_chunks = NumChunks(n);
  const BackwardArgs args{x.typed_data(), a.typed_data(), b.typed_data(),
                          mean.typed_data(), rstd.typed_data(),
                          dy.typed_data(), nullptr, d[1], d[2], c};
  std::vector<double> part(n_chunks * 2 * c, 0.0);
  ParallelFor(pool, n_chunks, [&](int64_t ch) {
    Backward<true>(args, ch * kChunk, std::min(n, (ch + 1) * kChunk),
                   part.data() + ch * 2 * c, nullptr);
  });
  ReduceChunks(part, n_chunks, c, out->typed_data());
  return ffi::Error::Success();
}

// dx = a g + k0 + xhat k1, k = (k0, k1): (2, C).
ffi::Error BackwardDxImpl(ffi::ThreadPool pool, Map x, Vec a, Vec b, Vec mean,
                          Vec rstd, Map dy, Mat k, ffi::Result<Map> dx) {
  const auto d = x.dimensions();
  const int64_t n = d[0];
  const BackwardArgs args{x.typed_data(), a.typed_data(), b.typed_data(),
                          mean.typed_data(), rstd.typed_data(),
                          dy.typed_data(), k.typed_data(), d[1], d[2], d[3]};
  float* pdx = dx->typed_data();
  ParallelFor(pool, NumChunks(n), [&](int64_t ch) {
    Backward<false>(args, ch * kChunk, std::min(n, (ch + 1) * kChunk), nullptr,
                    pdx);
  });
  return ffi::Error::Success();
}

// The arguments of both backward kernels: x, a, b, mean, rstd, dy.
auto BackwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Map>()
      .Arg<Vec>()
      .Arg<Vec>()
      .Arg<Vec>()
      .Arg<Vec>()
      .Arg<Map>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DselectBnReluPoolStats, StatsImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Map>().Ret<Mat>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectBnReluPoolForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Ret<Map>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectBnReluPoolBackwardSums, BackwardSumsImpl,
                              BackwardBinding().Ret<Mat>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectBnReluPoolBackwardDx, BackwardDxImpl,
                              BackwardBinding().Arg<Mat>().Ret<Map>());
