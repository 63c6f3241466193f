// The input rows of a Toeplitz (row-matmul) convolution, and their
// transpose, as XLA FFI custom calls for the CPU. Built and registered with
// bn_relu_pool.cc by dselect_jax/cpu/kernels.py (toeplitz_rows).
//
// Shape legend: N images, H rows, W columns, C channels (x is (N, H, W, C),
// float32, row-major); a kh x kw kernel; Ho = H - kh + 1 output rows, each
// cut into S = (W - kw + 1) / t segments of t output columns, a segment
// seeing U = t + kw - 1 input columns; K = kh * U * C.
//
//   rows[n, i, s, (dy, u, c)] = x[n, i + dy, s * t + u, c]   (N, Ho, S, K)
//
// Each (dy) piece is U * C contiguous floats of one input row, so the
// forward is a copy of spans and the transpose (the gradient) adds them back
// into a zeroed map. XLA:CPU builds the same rows with about four passes
// (stack, slices, concatenation) and its transpose with pads and adds; these
// kernels make one. A third writes the rows transposed, (K, N Ho S), for
// the weight gradient rows^T @ dy. Images are cut into chunks that XLA's CPU
// thread pool runs in parallel; every output element is written by one
// chunk, so the result does not depend on the threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dselect_cpu::NumChunks;
using dselect_cpu::ParallelFor;

using Map = ffi::BufferR4<ffi::F32>;  // x (N, H, W, C) or rows (N, Ho, S, K).

constexpr int64_t kChunk = 4;  // Images per parallel task.
constexpr int64_t kColumnChunk = 16;  // The same, for RowsByColumnImpl.

struct Geometry {
  int64_t n, h, w, c, kh, ho, s, t, u;
  int64_t span() const { return u * c; }    // Floats of one (dy) piece.
  int64_t k() const { return kh * span(); }  // Floats of one segment's row.
};

// How a kernel's output is laid out: the rows (N, Ho, S, K), or the rows
// transposed (K, N Ho S).
enum class Out { kRows, kColumns };

// The geometry of x (N, H, W, C), or an error where the kernel and segment
// do not fit x or `out`'s dimensions do not fit them.
ffi::Error Measure(ffi::Span<const int64_t> x, ffi::Span<const int64_t> out,
                   Out layout, int64_t kh, int64_t kw, int64_t t,
                   Geometry* g) {
  *g = Geometry{x[0], x[1], x[2], x[3], kh, x[1] - kh + 1, 0, t, t + kw - 1};
  if (kh < 1 || kw < 1 || t < 1 || g->ho < 1 || x[2] < kw ||
      (x[2] - kw + 1) % t != 0) {
    return ffi::Error::InvalidArgument(
        "toeplitz_rows: the kernel and segment do not fit the input");
  }
  g->s = (x[2] - kw + 1) / t;
  const std::vector<int64_t> want =
      layout == Out::kRows
          ? std::vector<int64_t>{g->n, g->ho, g->s, g->k()}
          : std::vector<int64_t>{g->k(), g->n * g->ho * g->s};
  if (!(out == ffi::Span<const int64_t>(want))) {
    return ffi::Error::InvalidArgument(
        "toeplitz_rows: the output's shape does not fit the input");
  }
  return ffi::Error::Success();
}

// rows from x.
ffi::Error RowsImpl(ffi::ThreadPool pool, Map x, ffi::Result<Map> rows,
                    int64_t kh, int64_t kw, int64_t t) {
  Geometry m;
  ffi::Error error =
      Measure(x.dimensions(), rows->dimensions(), Out::kRows, kh, kw, t, &m);
  if (error.failure()) return error;
  const float* px = x.typed_data();
  float* pr = rows->typed_data();
  const int64_t row = m.w * m.c, span = m.span();
  ParallelFor(pool, NumChunks(m.n, kChunk), [&](int64_t ch) {
    for (int64_t b = ch * kChunk; b < std::min(m.n, (ch + 1) * kChunk); ++b) {
      float* out = pr + b * m.ho * m.s * m.k();
      const float* img = px + b * m.h * row;
      for (int64_t i = 0; i < m.ho; ++i) {
        for (int64_t s = 0; s < m.s; ++s) {
          for (int64_t dy = 0; dy < m.kh; ++dy, out += span) {
            std::memcpy(out, img + (i + dy) * row + s * m.t * m.c,
                        span * sizeof(float));
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

inline void AddSpan(int64_t l, const float* __restrict__ src,
                    float* __restrict__ dst) {
  for (int64_t j = 0; j < l; ++j) dst[j] += src[j];
}

// dx from drows: the transpose of RowsImpl (overlapping pieces add up).
ffi::Error RowsTransposeImpl(ffi::ThreadPool pool, Map drows,
                             ffi::Result<Map> dx, int64_t kh, int64_t kw,
                             int64_t t) {
  Geometry m;
  ffi::Error error =
      Measure(dx->dimensions(), drows.dimensions(), Out::kRows, kh, kw, t, &m);
  if (error.failure()) return error;
  const float* pr = drows.typed_data();
  float* px = dx->typed_data();
  const int64_t row = m.w * m.c, span = m.span();
  ParallelFor(pool, NumChunks(m.n, kChunk), [&](int64_t ch) {
    for (int64_t b = ch * kChunk; b < std::min(m.n, (ch + 1) * kChunk); ++b) {
      const float* in = pr + b * m.ho * m.s * m.k();
      float* img = px + b * m.h * row;
      std::fill(img, img + m.h * row, 0.f);
      for (int64_t i = 0; i < m.ho; ++i) {
        for (int64_t s = 0; s < m.s; ++s) {
          for (int64_t dy = 0; dy < m.kh; ++dy, in += span) {
            AddSpan(span, in, img + (i + dy) * row + s * m.t * m.c);
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// rows transposed, (K, N Ho S), from x: the layout in which the weight
// gradient rows^T @ dy is a plain matmul (XLA would transpose rows first).
ffi::Error RowsByColumnImpl(ffi::ThreadPool pool, Map x,
                            ffi::Result<ffi::BufferR2<ffi::F32>> columns,
                            int64_t kh, int64_t kw, int64_t t) {
  Geometry m;
  ffi::Error error = Measure(x.dimensions(), columns->dimensions(),
                             Out::kColumns, kh, kw, t, &m);
  if (error.failure()) return error;
  const int64_t cols = m.n * m.ho * m.s;
  const float* px = x.typed_data();
  float* pc = columns->typed_data();
  const int64_t row = m.w * m.c, per_image = m.ho * m.s;
  // Each matrix row gets kColumnChunk images' columns in one contiguous
  // run: the images (small) are read many times from cache, the matrix
  // (large) is written once, a run at a time.
  ParallelFor(pool, NumChunks(m.n, kColumnChunk), [&](int64_t ch) {
    const int64_t b0 = ch * kColumnChunk;
    const int64_t b1 = std::min(m.n, b0 + kColumnChunk);
    for (int64_t dy = 0; dy < m.kh; ++dy) {
      for (int64_t u = 0; u < m.u; ++u) {
        for (int64_t c = 0; c < m.c; ++c) {
          float* out = pc + ((dy * m.u + u) * m.c + c) * cols + b0 * per_image;
          for (int64_t b = b0; b < b1; ++b) {
            const float* in = px + b * m.h * row + dy * row + u * m.c + c;
            for (int64_t i = 0; i < m.ho; ++i, in += row, out += m.s) {
              for (int64_t j = 0; j < m.s; ++j) out[j] = in[j * m.t * m.c];
            }
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Map>().Ret<Map>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectToeplitzRows, RowsImpl,
                              Binding()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("t"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectToeplitzRowsTranspose, RowsTransposeImpl,
                              Binding()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("t"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectToeplitzRowsByColumn, RowsByColumnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Ret<ffi::BufferR2<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("t"));
