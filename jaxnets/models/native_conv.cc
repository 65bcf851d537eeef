// Valid stride-1 2D convolutions for XLA:CPU in the batch-last (CHWN) layout, as XLA FFI
// handlers: the forward product, its input gradient and its weight gradient. Built and loaded
// by native_conv.py.
//
// Why: XLA:CPU computes a convolution with 1-16 channels fastest as im2col (shifted slices +
// one matmul), and that step is bound by writing and re-reading the patch matrices. These
// kernels read the input in place: in CHWN, one output row of all its pixels and images is one
// contiguous run of wo * batch floats, and each tap (i, j, c) reads the same run of the input
// shifted by j * batch. So a convolution is a sum of shifted, scaled long vectors.
//
// Shapes (row-major, the batch minor; leading dimensions beyond the 4 given are a stack of
// independent problems, as vmap makes them):
//   x  [..., C, H, W, B]   w  [..., KH, KW, C, O]   y  [..., O, H-KH+1, W-KW+1, B]

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A Vec is 16 floats, whatever the machine's vector width: the weight gradient sums its 16
// lanes at the end, so the width is part of the arithmetic, and the results are the same bits
// on every machine. It is held in registers of the machine's width: GCC lowers a vector type
// wider than the hardware's through the stack (measured on an AVX2 Zen 3: 6.5x slower than
// XLA's im2col), while one of the hardware's width stays in registers.
constexpr int kLanes = 16;
#if defined(__AVX512F__)
constexpr int kHardwareLanes = 16;
#elif defined(__AVX__)
constexpr int kHardwareLanes = 8;
#else
constexpr int kHardwareLanes = 4;
#endif
constexpr int kParts = kLanes / kHardwareLanes;
// aligned(4) so that loads and stores at any float offset are allowed.
typedef float HVec __attribute__((vector_size(kHardwareLanes * sizeof(float)), aligned(4)));

struct Vec {
  HVec part[kParts];
  float operator[](int lane) const { return part[lane / kHardwareLanes][lane % kHardwareLanes]; }
};

inline Vec Zero() {
  Vec v;
  for (int k = 0; k < kParts; ++k) v.part[k] = HVec{} + 0.0f;
  return v;
}
inline Vec Load(const float* p) {
  Vec v;
  for (int k = 0; k < kParts; ++k) v.part[k] = *reinterpret_cast<const HVec*>(p + k * kHardwareLanes);
  return v;
}
inline void Store(float* p, const Vec& v) {
  for (int k = 0; k < kParts; ++k) *reinterpret_cast<HVec*>(p + k * kHardwareLanes) = v.part[k];
}
// acc += s * x and acc += a * b, lane by lane.
inline void MulAdd(Vec& acc, float s, const Vec& x) {
  for (int k = 0; k < kParts; ++k) acc.part[k] += s * x.part[k];
}
inline void MulAdd(Vec& acc, const Vec& a, const Vec& b) {
  for (int k = 0; k < kParts; ++k) acc.part[k] += a.part[k] * b.part[k];
}

// Blocks of 16 accumulators fit AVX-512's 32 registers; where a Vec takes 2-4 registers the
// blocks are 4-6 accumulators. The block shape never changes what is summed in which order
// for an output.
constexpr bool kWideRegisters = kParts == 1;

using Units = std::vector<std::function<void()>>;

struct Geometry {
  int64_t c, h, w, b, kh, kw, o;
  int64_t ho() const { return h - kh + 1; }
  int64_t wo() const { return w - kw + 1; }
  int64_t row() const { return w * b; }      // floats per input row
  int64_t out_row() const { return wo() * b; }  // floats per output row
};

// y[o, r, t] = sum_{i, j, c} w[i, j, c, o] * x[c, r + i - pad, j * b + t] for OB outputs
// o0..o0+OB-1 over t in [t0, t0 + V * kLanes). Rows of x outside [0, h) count as zeros
// (skipped): `pad` > 0 only for the input gradient, which is a convolution of a padded dy.
template <int OB, int V>
inline void ForwardChunk(const Geometry& g, int64_t pad, const float* x, const float* w,
                         float* y, int64_t o0, int64_t r, int64_t t0, int64_t ho) {
  Vec acc[OB][V];
  for (int o = 0; o < OB; ++o)
    for (int v = 0; v < V; ++v) acc[o][v] = Zero();
  const int64_t i_lo = std::max<int64_t>(0, pad - r);
  const int64_t i_hi = std::min<int64_t>(g.kh, g.h + pad - r);
  for (int64_t i = i_lo; i < i_hi; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      for (int64_t c = 0; c < g.c; ++c) {
        const float* src = x + (c * g.h + r + i - pad) * g.row() + j * g.b + t0;
        const float* wt = w + ((i * g.kw + j) * g.c + c) * g.o + o0;
        Vec in[V];
        for (int v = 0; v < V; ++v) in[v] = Load(src + v * kLanes);
        for (int o = 0; o < OB; ++o) {
          const float s = wt[o];
          for (int v = 0; v < V; ++v) MulAdd(acc[o][v], s, in[v]);
        }
      }
    }
  }
  for (int o = 0; o < OB; ++o)
    for (int v = 0; v < V; ++v)
      Store(y + ((o0 + o) * ho + r) * g.out_row() + t0 + v * kLanes, acc[o][v]);
}

template <int OB, int V>
void ForwardRow(const Geometry& g, int64_t pad, const float* x, const float* w, float* y,
                int64_t o0, int64_t r) {
  constexpr int64_t kChunk = V * kLanes;
  const int64_t n = g.out_row(), ho = g.ho() + 2 * pad;
  for (int64_t t = 0; t < n; t += kChunk) {
    // The last chunk overlaps the one before instead of running past the row: its outputs
    // are recomputed with the same values.
    ForwardChunk<OB, V>(g, pad, x, w, y, o0, r, std::min(t, n - kChunk), ho);
  }
}

void ForwardScalar(const Geometry& g, int64_t pad, const float* x, const float* w, float* y) {
  const int64_t n = g.out_row(), ho = g.ho() + 2 * pad;
  for (int64_t o = 0; o < g.o; ++o)
    for (int64_t r = 0; r < ho; ++r)
      for (int64_t t = 0; t < n; ++t) {
        float acc = 0.0f;
        for (int64_t i = std::max<int64_t>(0, pad - r); i < std::min(g.kh, g.h + pad - r); ++i)
          for (int64_t j = 0; j < g.kw; ++j)
            for (int64_t c = 0; c < g.c; ++c)
              acc += w[((i * g.kw + j) * g.c + c) * g.o + o] *
                     x[(c * g.h + r + i - pad) * g.row() + j * g.b + t];
        y[(o * ho + r) * n + t] = acc;
      }
}

// Work units of one output row of a block of 8 outputs x 2 vectors or 4 outputs x 4 vectors:
// 16 accumulators, one input load per 4-8 multiply-adds.
void Forward(const Geometry& g, int64_t pad, const float* x, const float* w, float* y,
             Units& units) {
  const int64_t n = g.out_row(), ho = g.ho() + 2 * pad;
  if (n < 2 * kLanes) {
    units.push_back([=] { ForwardScalar(g, pad, x, w, y); });
    return;
  }
  auto rows = [&](auto row, int64_t o0) {
    for (int64_t r = 0; r < ho; ++r) units.push_back([=] { row(g, pad, x, w, y, o0, r); });
  };
  int64_t o = 0;
  if (!kWideRegisters) {
    for (; o + 6 <= g.o; o += 6) rows(ForwardRow<6, 1>, o);
    for (; o + 2 <= g.o; o += 2) rows(ForwardRow<2, 2>, o);
    for (; o < g.o; ++o) rows(ForwardRow<1, 2>, o);
    return;
  }
  for (; o + 8 <= g.o; o += 8) rows(ForwardRow<8, 2>, o);
  if (n >= 4 * kLanes) {
    for (; o + 4 <= g.o; o += 4) rows(ForwardRow<4, 4>, o);
    for (; o < g.o; ++o) rows(ForwardRow<1, 4>, o);
  }
  for (; o + 4 <= g.o; o += 4) rows(ForwardRow<4, 2>, o);
  for (; o < g.o; ++o) rows(ForwardRow<1, 2>, o);
}

// dx = the full correlation of dy with w: a valid forward convolution of dy, zero-padded by
// kh - 1 rows and kw - 1 columns on each side, with w flipped in both axes and its channel
// axes swapped. Only the columns are padded in memory; the forward skips the padding rows.
void InputGradient(const Geometry& g, const float* dy, const float* w, float* dx,
                   float* scratch, Units& copies, Units& units) {
  const Geometry p{g.o, g.ho(), g.w + g.kw - 1, g.b, g.kh, g.kw, g.c};
  const int64_t edge = (g.kw - 1) * g.b, n = g.out_row();
  float* dyp = scratch;
  float* wf = dyp + p.c * p.h * p.row();
  for (int64_t c = 0; c < p.c; ++c) {
    copies.push_back([=] {
      for (int64_t row = c * p.h; row < (c + 1) * p.h; ++row) {
        float* out = dyp + row * p.row();
        std::memset(out, 0, edge * sizeof(float));
        std::memcpy(out + edge, dy + row * n, n * sizeof(float));
        std::memset(out + edge + n, 0, edge * sizeof(float));
      }
    });
  }
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      for (int64_t c = 0; c < g.c; ++c)
        for (int64_t o = 0; o < g.o; ++o)
          wf[((i * g.kw + j) * g.o + o) * g.c + c] =
              w[(((g.kh - 1 - i) * g.kw + g.kw - 1 - j) * g.c + c) * g.o + o];
  Forward(p, g.kh - 1, dyp, wf, dx, units);
}

// dw[i, j, c, o] = sum_{r, t} x[c, r + i, j * b + t] * dy[o, r, t] for TB taps from tap0 (a
// tap is (i, j, c), in that row-major order) and OB outputs from o0.
template <int TB, int OB>
void WeightGradientBlock(const Geometry& g, const float* x, const float* dy, float* dw,
                         int64_t tap0, int64_t o0) {
  const int64_t n = g.out_row();
  const int64_t full = n / kLanes * kLanes;
  int64_t offset[TB];
  for (int k = 0; k < TB; ++k) {
    const int64_t tap = tap0 + k, c = tap % g.c, ij = tap / g.c;
    offset[k] = c * g.h * g.row() + (ij / g.kw) * g.row() + (ij % g.kw) * g.b;
  }
  Vec acc[TB][OB];
  float tail[TB][OB] = {};
  for (int k = 0; k < TB; ++k)
    for (int o = 0; o < OB; ++o) acc[k][o] = Zero();
  for (int64_t r = 0; r < g.ho(); ++r) {
    const float* d = dy + (o0 * g.ho() + r) * n;
    const float* src = x + r * g.row();
    for (int64_t t = 0; t < full; t += kLanes) {
      Vec dv[OB], xv[TB];
      for (int o = 0; o < OB; ++o) dv[o] = Load(d + o * g.ho() * n + t);
      for (int k = 0; k < TB; ++k) xv[k] = Load(src + offset[k] + t);
      for (int k = 0; k < TB; ++k)
        for (int o = 0; o < OB; ++o) MulAdd(acc[k][o], xv[k], dv[o]);
    }
    for (int64_t t = full; t < n; ++t)
      for (int k = 0; k < TB; ++k)
        for (int o = 0; o < OB; ++o) tail[k][o] += src[offset[k] + t] * d[o * g.ho() * n + t];
  }
  for (int k = 0; k < TB; ++k)
    for (int o = 0; o < OB; ++o) {
      float s = tail[k][o];
      for (int l = 0; l < kLanes; ++l) s += acc[k][o][l];
      dw[(tap0 + k) * g.o + o0 + o] = s;
    }
}

template <int TB>
void WeightGradientTaps(const Geometry& g, const float* x, const float* dy, float* dw,
                        int64_t tap0, Units& units) {
  constexpr int OB = kWideRegisters ? 4 : 2;
  int64_t o = 0;
  for (; o + OB <= g.o; o += OB)
    units.push_back([=] { WeightGradientBlock<TB, OB>(g, x, dy, dw, tap0, o); });
  for (; o < g.o; ++o)
    units.push_back([=] { WeightGradientBlock<TB, 1>(g, x, dy, dw, tap0, o); });
}

// Work units of 4 taps x 4 outputs: 16 accumulators, 8 loads per 16 multiply-adds.
void WeightGradient(const Geometry& g, const float* x, const float* dy, float* dw,
                    Units& units) {
  const int64_t taps = g.kh * g.kw * g.c;
  int64_t tap = 0;
  constexpr int TB = kWideRegisters ? 4 : 2;
  for (; tap + TB <= taps; tap += TB) WeightGradientTaps<TB>(g, x, dy, dw, tap, units);
  for (; tap < taps; ++tap) WeightGradientTaps<1>(g, x, dy, dw, tap, units);
}

// Runs the units on the calling thread and on the threads of XLA's intra-op pool. The caller
// claims units too and waits only for units that another thread has started, so it cannot
// wait on a task the busy pool has not run yet; a helper that starts after all units are
// claimed returns at once (the shared state outlives the call).
void RunUnits(ffi::ThreadPool& pool, Units units) {
  struct Shared {
    Units units;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      const int64_t n = units.size();
      for (int64_t k; (k = next.fetch_add(1)) < n;) {
        units[k]();
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->units = std::move(units);
  const int64_t n = shared->units.size();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

int64_t Stack(ffi::AnyBuffer::Dimensions dims) {
  int64_t n = 1;
  for (size_t k = 0; k + 4 < dims.size(); ++k) n *= dims[k];
  return n;
}

ffi::Error CheckRank(ffi::AnyBuffer::Dimensions dims, const char* what) {
  if (dims.size() < 4)
    return ffi::Error::InvalidArgument(std::string(what) + " must have rank >= 4");
  return ffi::Error::Success();
}

#define TAIL4(d) d[d.size() - 4], d[d.size() - 3], d[d.size() - 2], d[d.size() - 1]

// x [..., C, H, W, B], w [..., KH, KW, C, O] -> y [..., O, Ho, Wo, B]
ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = CheckRank(xd, "x"); e.failure()) return e;
  if (auto e = CheckRank(wd, "w"); e.failure()) return e;
  const int64_t xs[4] = {TAIL4(xd)}, ws[4] = {TAIL4(wd)};
  const Geometry g{xs[0], xs[1], xs[2], xs[3], ws[0], ws[1], ws[3]};
  const int64_t n = Stack(xd);
  Units units;
  for (int64_t k = 0; k < n; ++k)
    Forward(g, 0, x.typed_data() + k * g.c * g.h * g.row(),
            w.typed_data() + k * g.kh * g.kw * g.c * g.o,
            y->typed_data() + k * g.o * g.ho() * g.out_row(), units);
  RunUnits(pool, std::move(units));
  return ffi::Error::Success();
}

// dy [..., O, Ho, Wo, B], w [..., KH, KW, C, O] -> dx [..., C, H, W, B]
ffi::Error ConvInputGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                                 ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx) {
  auto dd = dy.dimensions(), wd = w.dimensions();
  if (auto e = CheckRank(dd, "dy"); e.failure()) return e;
  if (auto e = CheckRank(wd, "w"); e.failure()) return e;
  const int64_t ds[4] = {TAIL4(dd)}, ws[4] = {TAIL4(wd)};
  const Geometry g{ws[2], ds[1] + ws[0] - 1, ds[2] + ws[1] - 1, ds[3], ws[0], ws[1], ws[3]};
  const int64_t n = Stack(dd);
  // A padded copy of dy and a flipped w per stacked problem, in a buffer this thread keeps:
  // a fresh megabyte-sized allocation per call costs its page faults every time.
  const int64_t per_problem = g.o * g.ho() * (g.w + g.kw - 1) * g.b + g.kh * g.kw * g.c * g.o;
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(n * per_problem)) scratch.resize(n * per_problem);
  Units copies, units;
  for (int64_t k = 0; k < n; ++k)
    InputGradient(g, dy.typed_data() + k * g.o * g.ho() * g.out_row(),
                  w.typed_data() + k * g.kh * g.kw * g.c * g.o,
                  dx->typed_data() + k * g.c * g.h * g.row(), scratch.data() + k * per_problem,
                  copies, units);
  RunUnits(pool, std::move(copies));
  RunUnits(pool, std::move(units));
  return ffi::Error::Success();
}

// x [..., C, H, W, B], dy [..., O, Ho, Wo, B] -> dw [..., KH, KW, C, O]
ffi::Error ConvWeightGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), dd = dy.dimensions();
  if (auto e = CheckRank(xd, "x"); e.failure()) return e;
  if (auto e = CheckRank(dd, "dy"); e.failure()) return e;
  const int64_t xs[4] = {TAIL4(xd)}, ds[4] = {TAIL4(dd)};
  const Geometry g{xs[0], xs[1], xs[2], xs[3], xs[1] - ds[1] + 1, xs[2] - ds[2] + 1, ds[0]};
  const int64_t n = Stack(xd);
  Units units;
  for (int64_t k = 0; k < n; ++k)
    WeightGradient(g, x.typed_data() + k * g.c * g.h * g.row(),
                   dy.typed_data() + k * g.o * g.ho() * g.out_row(),
                   dw->typed_data() + k * g.kh * g.kw * g.c * g.o, units);
  RunUnits(pool, std::move(units));
  return ffi::Error::Success();
}

}  // namespace

// All three: (thread pool, two float32 operands) -> one float32 result.
#define JAXNETS_CONV_HANDLER(name, impl)                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                          \
                                ffi::Ffi::Bind()                     \
                                    .Ctx<ffi::ThreadPool>()          \
                                    .Arg<ffi::Buffer<ffi::F32>>()    \
                                    .Arg<ffi::Buffer<ffi::F32>>()    \
                                    .Ret<ffi::Buffer<ffi::F32>>());

JAXNETS_CONV_HANDLER(JaxnetsConvForward, ConvForwardImpl)
JAXNETS_CONV_HANDLER(JaxnetsConvInputGradient, ConvInputGradientImpl)
JAXNETS_CONV_HANDLER(JaxnetsConvWeightGradient, ConvWeightGradientImpl)
