// Direct (not matmul) VALID 2-D convolutions for the CPU, as XLA FFI custom
// calls. Built and registered with the other kernels by
// dselect_jax/cpu/kernels.py (conv2d, conv_relu_pool).
//
// Shape legend: N images, H rows, W columns, G groups of Cg input and Fg
// output channels (x is (N, H, W, G Cg), float32, row-major); a kh x kw
// kernel (G, kh, kw, Cg, Fg) and a bias (G, Fg); x padded with pad_h zero
// rows above and below and pad_w zero columns left and right gives
// Ho = H + 2 pad_h - kh + 1 output rows and Wo = W + 2 pad_w - kw + 1 output
// columns:
//
//   z[n, i, j, g Fg + f] = bias[g, f] + sum_{dy, dx, c}
//       xpad[n, i + dy, j + dx, g Cg + c] k[g, dy, dx, c, f]
//
// DselectConv writes z (N, Ho, Wo, G Fg). DselectConvReluPool writes
//   y[n, p, q, :] = max(0, max_{i in 2p..2p+1, j in 2q..2q+1} z[n, i, j, :])
// (N, Ho / 2, Wo / 2, G Fg), never storing z: the experts' blocks in
// evaluation once each BatchNorm is folded into its convolution.
// DselectConvWeightGrad writes the gradients of sum(z * dz) for G = 1 and
// no padding: dk[dy, dx, c, f] = sum_{n, i, j} x[n, i + dy, j + dx, c]
// dz[n, i, j, f] and dbias[f] = sum dz[..., f].
//
// How: each image is copied once into channel planes (zero-padded), and a
// block of 2 output rows x 16 output columns x FB output channels is summed
// in registers, 16-float vectors, one per row and channel: each tap
// broadcasts one weight against 16 contiguous input columns. The weight
// gradient keeps one vector per (tap, channel) over a chunk of images and
// adds its lanes once. With MultiMNIST's few channels (1 -> 10 -> 20) this
// beats XLA:CPU's convolution and the Toeplitz matmuls (no 1.6x of extra
// FLOPs, no matrix of rows; docs/performance.md). Images are cut into
// chunks that XLA's CPU thread pool runs in parallel; each output element
// is written by one chunk, and per-chunk weight gradients are added in
// chunk order, so results do not depend on the threads.

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

using Map = ffi::BufferR4<ffi::F32>;      // x, z or y.
using Kernel = ffi::Buffer<ffi::F32, 5>;  // (G, kh, kw, Cg, Fg)
using Bias = ffi::BufferR2<ffi::F32>;     // (G, Fg)

constexpr int kLanes = 16;     // Output columns per block.
constexpr int64_t kChunk = 4;  // Images per parallel task.
constexpr int64_t kGradChunk = 8;  // The same, for the weight gradient.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes Load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float Sum(Lanes v) {
  float lanes[kLanes], s = 0.f;
  std::memcpy(lanes, &v, sizeof(v));
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

struct Geometry {
  int64_t n, h, w, g, cg, fg, kh, kw, pad_h, pad_w, ho, wo;
  int64_t blocks() const { return (wo + kLanes - 1) / kLanes; }
  // A channel plane: the padded image, plus the columns that the last block
  // and the kernel's overhang read, plus one row for a block's bottom row
  // when Ho is odd; all zeros but the image.
  int64_t plane_w() const { return blocks() * kLanes + kw - 1; }
  int64_t plane_h() const { return h + 2 * pad_h + 1; }
  int64_t plane() const { return plane_h() * plane_w(); }
};

Geometry Measure(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                 int64_t pad_h, int64_t pad_w) {
  return Geometry{x[0],  x[1],  x[2],  k[0],
                  k[3],  k[4],  k[1],  k[2],
                  pad_h, pad_w, x[1] + 2 * pad_h - k[1] + 1,
                  x[2] + 2 * pad_w - k[2] + 1};
}

// One image (H, W, C) into its channel planes (C, plane_h, plane_w), which
// hold zeros where no pixel goes.
void ToPlanes(const Geometry& m, int64_t channels, const float* img,
              float* planes) {
  const int64_t pw = m.plane_w();
  for (int64_t i = 0; i < m.h; ++i) {
    for (int64_t j = 0; j < m.w; ++j) {
      const float* pixel = img + (i * m.w + j) * channels;
      float* at = planes + (i + m.pad_h) * pw + j + m.pad_w;
      for (int64_t c = 0; c < channels; ++c) at[c * m.plane()] = pixel[c];
    }
  }
}

// Group g's output channels [f0, f0 + FB) at rows i0, i0 + 1 and columns
// [j0, j0 + 16) of one image (planes), without the bias.
template <int FB>
void Block(const Geometry& m, const float* planes, const float* kernel,
           int64_t g, int64_t f0, int64_t i0, int64_t j0, Lanes* top,
           Lanes* bottom) {
  for (int f = 0; f < FB; ++f) top[f] = bottom[f] = Lanes{};
  const int64_t pw = m.plane_w();
  for (int64_t c = 0; c < m.cg; ++c) {
    const float* plane = planes + (g * m.cg + c) * m.plane();
    for (int64_t dy = 0; dy < m.kh; ++dy) {
      const float* row = plane + (i0 + dy) * pw + j0;
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
}

// z of one image (Ho, Wo, G Fg), or with `pool` y (Ho / 2, Wo / 2, G Fg).
template <int FB>
void Image(const Geometry& m, const float* planes, const float* kernel,
           const float* bias, bool pool, float* out) {
  const int64_t channels = m.g * m.fg;
  Lanes top[FB], bottom[FB];
  float lanes[kLanes];
  for (int64_t g = 0; g < m.g; ++g) {
    for (int64_t i0 = 0; i0 < m.ho; i0 += 2) {
      for (int64_t j0 = 0; j0 < m.wo; j0 += kLanes) {
        const int64_t cols = std::min<int64_t>(kLanes, m.wo - j0);
        for (int64_t f0 = 0; f0 < m.fg; f0 += FB) {
          Block<FB>(m, planes, kernel, g, f0, i0, j0, top, bottom);
          const int64_t at = g * m.fg + f0;
          for (int f = 0; f < FB; ++f) {
            const float b = bias[at + f];
            if (pool) {
              const Lanes v = top[f] > bottom[f] ? top[f] : bottom[f];
              std::memcpy(lanes, &v, sizeof(v));
              float* y = out + (i0 / 2 * (m.wo / 2) + j0 / 2) * channels + at;
              for (int64_t q = 0; q < cols / 2; ++q) {
                y[q * channels + f] = std::max(
                    std::max(lanes[2 * q], lanes[2 * q + 1]) + b, 0.f);
              }
              continue;
            }
            for (int r = 0; r < 2 && i0 + r < m.ho; ++r) {
              std::memcpy(lanes, r ? &bottom[f] : &top[f], sizeof(Lanes));
              float* z = out + ((i0 + r) * m.wo + j0) * channels + at;
              for (int64_t j = 0; j < cols; ++j) {
                z[j * channels + f] = lanes[j] + b;
              }
            }
          }
        }
      }
    }
  }
}

// The register block's width: the largest of 10, 8, 4, 1 dividing Fg.
template <typename F>
void WithBlockWidth(int64_t fg, F&& f) {
  if (fg % 10 == 0) {
    f(std::integral_constant<int, 10>());
  } else if (fg % 8 == 0) {
    f(std::integral_constant<int, 8>());
  } else if (fg % 4 == 0) {
    f(std::integral_constant<int, 4>());
  } else {
    f(std::integral_constant<int, 1>());
  }
}

ffi::Error Convolve(ffi::ThreadPool& pool, const Map& x, const Kernel& kernel,
                    const Bias& bias, int64_t pad_h, int64_t pad_w,
                    bool do_pool, Map* out) {
  const Geometry m =
      Measure(x.dimensions(), kernel.dimensions(), pad_h, pad_w);
  const auto bd = bias.dimensions(), od = out->dimensions();
  const int64_t oh = do_pool ? m.ho / 2 : m.ho, ow = do_pool ? m.wo / 2 : m.wo;
  if (pad_h < 0 || pad_w < 0 || m.g * m.cg != x.dimensions()[3] ||
      m.ho < 1 || m.wo < 1 || (do_pool && (m.ho % 2 || m.wo % 2)) ||
      bd[0] != m.g || bd[1] != m.fg ||
      od[0] != m.n || od[1] != oh || od[2] != ow || od[3] != m.g * m.fg) {
    return ffi::Error::InvalidArgument(
        "direct_conv: the kernel, bias and output do not fit the input");
  }
  const float* px = x.typed_data();
  const float* pk = kernel.typed_data();
  const float* pb = bias.typed_data();
  float* po = out->typed_data();
  const int64_t channels = m.g * m.cg;
  const int64_t image = m.h * m.w * channels;
  const int64_t per_out = oh * ow * m.g * m.fg;
  ParallelFor(pool, NumChunks(m.n, kChunk), [&](int64_t ch) {
    std::vector<float> planes(channels * m.plane(), 0.f);
    for (int64_t n = ch * kChunk; n < std::min(m.n, (ch + 1) * kChunk); ++n) {
      ToPlanes(m, channels, px + n * image, planes.data());
      WithBlockWidth(m.fg, [&](auto fb) {
        Image<decltype(fb)::value>(m, planes.data(), pk, pb, do_pool,
                                   po + n * per_out);
      });
    }
  });
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::ThreadPool pool, Map x, Kernel kernel, Bias bias,
                    ffi::Result<Map> z, int64_t pad_h, int64_t pad_w) {
  return Convolve(pool, x, kernel, bias, pad_h, pad_w, false, &*z);
}

ffi::Error ConvReluPoolImpl(ffi::ThreadPool pool, Map x, Kernel kernel,
                            Bias bias, ffi::Result<Map> y) {
  return Convolve(pool, x, kernel, bias, 0, 0, true, &*y);
}

// dk for one group, no padding: for each FB output channels, input channel
// c and kernel row dy, the KW x FB sums over the chunk's images, rows and
// columns stay in registers; each step loads FB vectors of dz and KW of x
// for KW FB multiply-adds.
template <int FB, int KW>
void WeightGradChunk(const Geometry& m, const float* xplanes,
                     const float* dzplanes, int64_t images, float* dk) {
  const int64_t pw = m.plane_w(), dzw = m.blocks() * kLanes;
  const int64_t xsize = m.cg * m.plane(), dzsize = m.fg * m.ho * dzw;
  Lanes acc[KW][FB], d[FB];
  for (int64_t f0 = 0; f0 < m.fg; f0 += FB) {
    for (int64_t c = 0; c < m.cg; ++c) {
      for (int64_t dy = 0; dy < m.kh; ++dy) {
        for (int dx = 0; dx < KW; ++dx) {
          for (int f = 0; f < FB; ++f) acc[dx][f] = Lanes{};
        }
        for (int64_t n = 0; n < images; ++n) {
          const float* xp = xplanes + n * xsize + c * m.plane() + dy * pw;
          const float* dzp = dzplanes + n * dzsize + f0 * m.ho * dzw;
          for (int64_t i = 0; i < m.ho; ++i) {
            for (int64_t j0 = 0; j0 < dzw; j0 += kLanes) {
              for (int f = 0; f < FB; ++f) {
                d[f] = Load(dzp + (f * m.ho + i) * dzw + j0);
              }
              for (int dx = 0; dx < KW; ++dx) {
                const Lanes a = Load(xp + i * pw + j0 + dx);
                for (int f = 0; f < FB; ++f) acc[dx][f] += a * d[f];
              }
            }
          }
        }
        for (int dx = 0; dx < KW; ++dx) {
          float* out = dk + ((dy * m.kw + dx) * m.cg + c) * m.fg + f0;
          for (int f = 0; f < FB; ++f) out[f] = Sum(acc[dx][f]);
        }
      }
    }
  }
}

// The same for any kernel width, one tap at a time (FB loads per FB
// multiply-adds).
template <int FB>
void WeightGradChunkAnyWidth(const Geometry& m, const float* xplanes,
                             const float* dzplanes, int64_t images,
                             float* dk) {
  const int64_t pw = m.plane_w(), dzw = m.blocks() * kLanes;
  const int64_t xsize = m.cg * m.plane(), dzsize = m.fg * m.ho * dzw;
  Lanes acc[FB];
  for (int64_t f0 = 0; f0 < m.fg; f0 += FB) {
    for (int64_t c = 0; c < m.cg; ++c) {
      for (int64_t dy = 0; dy < m.kh; ++dy) {
        for (int64_t dx = 0; dx < m.kw; ++dx) {
          for (int f = 0; f < FB; ++f) acc[f] = Lanes{};
          for (int64_t n = 0; n < images; ++n) {
            const float* xp = xplanes + n * xsize + c * m.plane() + dx;
            const float* dzp = dzplanes + n * dzsize + f0 * m.ho * dzw;
            for (int64_t i = 0; i < m.ho; ++i) {
              for (int64_t j0 = 0; j0 < dzw; j0 += kLanes) {
                const Lanes a = Load(xp + (i + dy) * pw + j0);
                const float* d = dzp + i * dzw + j0;
                for (int f = 0; f < FB; ++f) {
                  acc[f] += a * Load(d + f * m.ho * dzw);
                }
              }
            }
          }
          float* out = dk + ((dy * m.kw + dx) * m.cg + c) * m.fg + f0;
          for (int f = 0; f < FB; ++f) out[f] = Sum(acc[f]);
        }
      }
    }
  }
}

ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, Map x, Map dz,
                              ffi::Result<Kernel> dk,
                              ffi::Result<ffi::BufferR1<ffi::F32>> dbias) {
  const auto kd = dk->dimensions();
  const Geometry m = Measure(x.dimensions(), kd, 0, 0);
  const auto zd = dz.dimensions();
  if (kd[0] != 1 || m.cg != x.dimensions()[3] || m.ho < 1 || m.wo < 1 ||
      zd[0] != m.n || zd[1] != m.ho || zd[2] != m.wo || zd[3] != m.fg ||
      dbias->dimensions()[0] != m.fg) {
    return ffi::Error::InvalidArgument(
        "direct_conv: the weight gradient's shapes do not fit the input");
  }
  const int64_t chunks = NumChunks(m.n, kGradChunk);
  const int64_t taps = m.kh * m.kw * m.cg * m.fg;
  // Each chunk's dk (taps) and dbias (Fg), added in chunk order below.
  std::vector<float> partial(chunks * (taps + m.fg));
  const float* px = x.typed_data();
  const float* pz = dz.typed_data();
  const int64_t dzw = m.blocks() * kLanes;
  ParallelFor(pool, chunks, [&](int64_t ch) {
    const int64_t n0 = ch * kGradChunk;
    const int64_t images = std::min(m.n, n0 + kGradChunk) - n0;
    std::vector<float> xplanes(images * m.cg * m.plane(), 0.f);
    std::vector<float> dzplanes(images * m.fg * m.ho * dzw, 0.f);
    for (int64_t n = 0; n < images; ++n) {
      ToPlanes(m, m.cg, px + (n0 + n) * m.h * m.w * m.cg,
               xplanes.data() + n * m.cg * m.plane());
      const float* z = pz + (n0 + n) * m.ho * m.wo * m.fg;
      float* planes = dzplanes.data() + n * m.fg * m.ho * dzw;
      for (int64_t i = 0; i < m.ho; ++i) {
        for (int64_t j = 0; j < m.wo; ++j) {
          for (int64_t f = 0; f < m.fg; ++f) {
            planes[(f * m.ho + i) * dzw + j] = z[(i * m.wo + j) * m.fg + f];
          }
        }
      }
    }
    float* out = partial.data() + ch * (taps + m.fg);
    if (m.kw == 5 && m.fg % 5 == 0) {  // MultiMNIST's experts.
      WeightGradChunk<5, 5>(m, xplanes.data(), dzplanes.data(), images, out);
    } else {
      WithBlockWidth(m.fg, [&](auto fb) {
        WeightGradChunkAnyWidth<decltype(fb)::value>(
            m, xplanes.data(), dzplanes.data(), images, out);
      });
    }
    for (int64_t f = 0; f < m.fg; ++f) {  // dbias: the planes' sums.
      float sum = 0.f;
      for (int64_t n = 0; n < images; ++n) {
        const float* d = dzplanes.data() + (n * m.fg + f) * m.ho * dzw;
        for (int64_t p = 0; p < m.ho * dzw; ++p) sum += d[p];
      }
      out[taps + f] = sum;
    }
  });
  float* pk = dk->typed_data();
  float* pb = dbias->typed_data();
  std::fill(pk, pk + taps, 0.f);
  std::fill(pb, pb + m.fg, 0.f);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const float* p = partial.data() + ch * (taps + m.fg);
    for (int64_t t = 0; t < taps; ++t) pk[t] += p[t];
    for (int64_t f = 0; f < m.fg; ++f) pb[f] += p[taps + f];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Kernel>()
                                  .Arg<Bias>()
                                  .Ret<Map>()
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectConvReluPool, ConvReluPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Kernel>()
                                  .Arg<Bias>()
                                  .Ret<Map>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DselectConvWeightGrad, ConvWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Map>()
                                  .Arg<Map>()
                                  .Ret<Kernel>()
                                  .Ret<ffi::BufferR1<ffi::F32>>());
