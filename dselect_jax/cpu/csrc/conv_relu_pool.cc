// A grouped VALID convolution + bias + ReLU + 2x2 max pooling, forward only,
// as an XLA FFI custom call for the CPU: the evaluation path of the experts'
// blocks once each BatchNorm is folded into its convolution. Built and
// registered with the other kernels by dselect_jax/cpu/kernels.py
// (conv_relu_pool).
//
// Shape legend: N images, H rows, W columns, G groups of Cg input and Fg
// output channels (x is (N, H, W, G Cg), float32, row-major); a kh x kw
// kernel (G, kh, kw, Cg, Fg) and a bias (G, Fg); Ho = H - kh + 1 and
// Wo = W - kw + 1 (both even) output rows and columns, pooled to
// (N, Ho / 2, Wo / 2, G Fg):
//
//   z[n, i, j, g Fg + f] = bias[g, f]
//       + sum_{dy, dx, c} x[n, i + dy, j + dx, g Cg + c] k[g, dy, dx, c, f]
//   y[n, p, q, :] = max(0, max_{i in 2p..2p+1, j in 2q..2q+1} z[n, i, j, :])
//
// Why: XLA:CPU runs the fused evaluation's 8 small second convolutions (10
// channels in, 20 out) well below its matmul rate, and writes the first
// convolution's full-size output before pooling it. Here each image is
// copied once into channel planes (zero-padded on the right), and a block
// of 2 output rows x 16 output columns x FB output channels is summed in
// registers (16-float vectors, one per row and channel: the taps broadcast
// one weight against 16 contiguous input columns), then pooled and written:
// the full-size map never reaches memory. Images are cut into chunks that
// XLA's CPU thread pool runs in parallel; each output element is written by
// one chunk, in one summation order, so the result does not depend on the
// threads.

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

using Map = ffi::BufferR4<ffi::F32>;        // x or y.
using Kernel = ffi::Buffer<ffi::F32, 5>;    // (G, kh, kw, Cg, Fg)
using Bias = ffi::BufferR2<ffi::F32>;       // (G, Fg)

constexpr int kLanes = 16;           // Output columns per block.
constexpr int64_t kChunk = 4;        // Images per parallel task.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

struct Geometry {
  int64_t n, h, w, g, cg, fg, kh, kw, ho, wo;
  int64_t blocks() const { return (wo + kLanes - 1) / kLanes; }
  // A channel plane's row: every block's 16 columns plus the kernel's
  // overhang, so that no load leaves the plane.
  int64_t plane_w() const { return blocks() * kLanes + kw - 1; }
};

inline Lanes Load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Group g's output channels [f0, f0 + FB) for output rows 2p, 2p + 1 and
// columns [j0, j0 + 16) of one image, pooled into y (this image's
// (Ho / 2, Wo / 2, G Fg) map). planes: the image's channel planes, (G Cg, H,
// plane_w).
template <int FB>
void Block(const Geometry& m, const float* planes, const float* kernel,
           const float* bias, int64_t g, int64_t f0, int64_t p, int64_t j0,
           float* y) {
  Lanes top[FB], bottom[FB];
  for (int f = 0; f < FB; ++f) top[f] = bottom[f] = Lanes{};
  const int64_t pw = m.plane_w();
  for (int64_t c = 0; c < m.cg; ++c) {
    const float* plane = planes + (g * m.cg + c) * m.h * pw;
    for (int64_t dy = 0; dy < m.kh; ++dy) {
      const float* row = plane + (2 * p + dy) * pw + j0;
      for (int64_t dx = 0; dx < m.kw; ++dx) {
        const Lanes a = Load(row + dx), b = Load(row + pw + dx);
        const float* k =
            kernel + (((g * m.kh + dy) * m.kw + dx) * m.cg + c) * m.fg + f0;
        for (int f = 0; f < FB; ++f) {
          top[f] += k[f] * a;
          bottom[f] += k[f] * b;
        }
      }
    }
  }
  const int64_t pooled_w = m.wo / 2, channels = m.g * m.fg;
  const int64_t pairs = std::min<int64_t>(kLanes, m.wo - j0) / 2;
  for (int f = 0; f < FB; ++f) {
    float rows[kLanes];
    const Lanes v = top[f] > bottom[f] ? top[f] : bottom[f];
    std::memcpy(rows, &v, sizeof(v));
    const float b = bias[g * m.fg + f0 + f];
    float* out = y + (p * pooled_w + j0 / 2) * channels + g * m.fg + f0 + f;
    for (int64_t q = 0; q < pairs; ++q) {
      out[q * channels] = std::max(std::max(rows[2 * q], rows[2 * q + 1]) + b,
                                   0.f);
    }
  }
}

template <int FB>
void Image(const Geometry& m, const float* planes, const float* kernel,
           const float* bias, float* y) {
  for (int64_t g = 0; g < m.g; ++g) {
    for (int64_t p = 0; p < m.ho / 2; ++p) {
      for (int64_t jb = 0; jb < m.blocks(); ++jb) {
        for (int64_t f0 = 0; f0 < m.fg; f0 += FB) {
          Block<FB>(m, planes, kernel, bias, g, f0, p, jb * kLanes, y);
        }
      }
    }
  }
}

ffi::Error ConvReluPoolImpl(ffi::ThreadPool pool, Map x, Kernel kernel,
                            Bias bias, ffi::Result<Map> y) {
  const auto xd = x.dimensions(), kd = kernel.dimensions();
  Geometry m{xd[0], xd[1], xd[2], kd[0], kd[3], kd[4],
             kd[1], kd[2], xd[1] - kd[1] + 1, xd[2] - kd[2] + 1};
  const auto bd = bias.dimensions(), yd = y->dimensions();
  if (m.g * m.cg != xd[3] || m.ho < 2 || m.wo < 2 || m.ho % 2 ||
      m.wo % 2 || bd[0] != m.g || bd[1] != m.fg || yd[0] != m.n ||
      yd[1] != m.ho / 2 || yd[2] != m.wo / 2 || yd[3] != m.g * m.fg) {
    return ffi::Error::InvalidArgument(
        "conv_relu_pool: the kernel, bias and output do not fit the input");
  }
  const float* px = x.typed_data();
  const float* pk = kernel.typed_data();
  const float* pb = bias.typed_data();
  float* py = y->typed_data();
  const int64_t channels = m.g * m.cg, pw = m.plane_w();
  const int64_t image = m.h * m.w * channels;
  const int64_t pooled = (m.ho / 2) * (m.wo / 2) * m.g * m.fg;
  ParallelFor(pool, NumChunks(m.n, kChunk), [&](int64_t ch) {
    std::vector<float> planes(channels * m.h * pw, 0.f);  // Padding stays 0.
    for (int64_t n = ch * kChunk; n < std::min(m.n, (ch + 1) * kChunk); ++n) {
      const float* img = px + n * image;
      for (int64_t i = 0; i < m.h; ++i) {
        for (int64_t j = 0; j < m.w; ++j) {
          const float* pixel = img + (i * m.w + j) * channels;
          for (int64_t c = 0; c < channels; ++c) {
            planes[(c * m.h + i) * pw + j] = pixel[c];
          }
        }
      }
      float* out = py + n * pooled;
      if (m.fg % 10 == 0) {
        Image<10>(m, planes.data(), pk, pb, out);
      } else if (m.fg % 8 == 0) {
        Image<8>(m, planes.data(), pk, pb, out);
      } else if (m.fg % 4 == 0) {
        Image<4>(m, planes.data(), pk, pb, out);
      } else {
        Image<1>(m, planes.data(), pk, pb, out);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectConvReluPool, ConvReluPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Kernel>()
                                  .Arg<Bias>()
                                  .Ret<Map>());
