// The elementwise glue of a Llama decoder layer, fused: one pass over the rows instead of the
// 3-8 ATen calls (and their temporaries) each of these is in eager torch.
//
// Built with paged_decode.cpp into one extension by ecoserve_worker/kernels.py and registered as
// torch.ops.ecoserve.{add_rms_norm, silu_mul, rope_}. model_runner.py's torch code is the
// reference each is tested against (tests/test_worker_kernels.py).
//
//   add_rms_norm(x [T, N], delta [T, N] or None, w [N], eps) -> y [T, N]
//       x += delta (in place: the residual stream), then y = w * rms_norm(x).
//   silu_mul(gate_up [T, 2I]) -> [T, I]          silu(gate) * up, gate the first I columns.
//   rope_(qk [T, H, D], cos [T, D], sin [T, D])   in place: qk = qk * cos + rotate_half(qk) * sin
//                                                 (rows and heads may be strided; D contiguous).
//
// Rounding follows the HF modules step by step, so bf16 results match transformers' bf16
// ones: math in fp32, rounded to the tensor's dtype where HF's code holds a bf16 tensor
// (the normalised x before the weight multiply, silu(gate) before the multiply, rotate*sin
// before the add). Why it pays: a 16-row SmolLM2 decode step spent ~11 ms of 46 in this glue
// (2-core EPYC, bf16, 1 thread), most of it per-call overhead of tiny ATen ops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

#include "vec8.h"  // f8, L, load8, store8, exp8, to_f32

// fp32 -> the storage type: bf16 rounds to nearest even by bit operations (NaN kept a quiet
// NaN), a plain loop the compiler vectorises.
inline void from_f32(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}
inline void from_f32(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    d[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7fc0u : rounded);
  }
}

// Round fp32 values to T's precision in place (a no-op for fp32): where HF's module holds an
// intermediate in the model's dtype, so must we.
inline void round_as(float*, int64_t, const float*) {}
inline void round_as(float* v, int64_t n, const c10::BFloat16*) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &v[i], sizeof bits);
    bits = v[i] != v[i] ? 0x7fc00000u : ((bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u);
    std::memcpy(&v[i], &bits, sizeof bits);
  }
}

inline float sum_squares(const float* v, int64_t n) {
  f8 acc = f8{}, acc1 = f8{};  // two chains: FMA latency, not throughput
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const f8 a = load8(v + i), b = load8(v + i + L);
    acc += a * a;
    acc1 += b * b;
  }
  for (; i + L <= n; i += L) {
    const f8 a = load8(v + i);
    acc += a * a;
  }
  acc += acc1;
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += v[i] * v[i];
  return s;
}

constexpr int64_t GRAIN_ELEMS = 1 << 15;  // a thread task covers rows of about this many values

inline int64_t grain(int64_t row_elems) {
  return std::max<int64_t>(1, GRAIN_ELEMS / std::max<int64_t>(1, row_elems));
}

template <typename T>
void add_rms_norm_rows(T* x, const T* delta, const T* weight, T* y, int64_t rows, int64_t n,
                       int64_t x_stride, int64_t d_stride, float eps) {
  at::parallel_for(0, rows, grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * n);
    float *v = buf.data(), *dv = v + n, *wv = dv + n;
    const float* w = to_f32(weight, wv, n);
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * x_stride;
      const float* xv = to_f32(xr, v, n);
      if (xv != v) std::memcpy(v, xv, n * sizeof(float));
      if (delta) {  // the residual add, in x's dtype, written back: x is the residual stream
        const float* d = to_f32(delta + r * d_stride, dv, n);
        for (int64_t i = 0; i < n; ++i) v[i] += d[i];
        round_as(v, n, xr);
        from_f32(v, xr, n);
      }
      const float inv = 1.f / std::sqrt(sum_squares(v, n) / static_cast<float>(n) + eps);
      for (int64_t i = 0; i < n; ++i) v[i] *= inv;
      round_as(v, n, xr);  // HF: weight * normalised.to(dtype)
      for (int64_t i = 0; i < n; ++i) v[i] *= w[i];
      from_f32(v, y + r * n, n);
    }
  });
}

template <typename T>
void silu_mul_rows(const T* in, T* out, int64_t rows, int64_t half, int64_t in_stride) {
  at::parallel_for(0, rows, grain(2 * half), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * half);
    float *g = buf.data(), *u = g + half, *o = u + half;
    for (int64_t r = r0; r < r1; ++r) {
      const float* gv = to_f32(in + r * in_stride, g, half);
      const float* uv = to_f32(in + r * in_stride + half, u, half);
      int64_t i = 0;
      for (; i + L <= half; i += L) {  // silu(x) = x / (1 + e^-x)
        const f8 x = load8(gv + i);
        store8(o + i, x / (exp8(f8{} - x) + 1.f));
      }
      for (; i < half; ++i) o[i] = gv[i] / (1.f + std::exp(-gv[i]));
      round_as(o, half, out);  // HF: act_fn(gate) in the model's dtype, then * up
      for (i = 0; i < half; ++i) o[i] *= uv[i];
      from_f32(o, out + r * half, half);
    }
  });
}

template <typename T>
void rope_rows(T* qk, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t dim,
               int64_t row_stride, int64_t head_stride) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, grain(heads * dim), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(5 * dim);
    float *cb = buf.data(), *sb = cb + dim, *v = sb + dim, *rs = v + dim, *o = rs + dim;
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = to_f32(cos + r * dim, cb, dim);
      const float* s = to_f32(sin + r * dim, sb, dim);
      for (int64_t h = 0; h < heads; ++h) {
        T* head = qk + r * row_stride + h * head_stride;
        const float* x = to_f32(head, v, dim);
        for (int64_t i = 0; i < half; ++i) {  // rotate_half(x) * sin, rounded as HF's is
          rs[i] = -x[i + half] * s[i];
          rs[i + half] = x[i] * s[i + half];
        }
        round_as(rs, dim, head);
        for (int64_t i = 0; i < dim; ++i) o[i] = rs[i] + x[i] * c[i];
        from_f32(o, head, dim);
      }
    }
  });
}

at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta,
                        const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "add_rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "add_rms_norm: x [T, N], rows contiguous");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: weight [N] of x's dtype");
  const at::Tensor w = weight.contiguous();
  at::Tensor d;
  if (delta.has_value() && delta->defined()) {
    d = *delta;
    TORCH_CHECK(d.sizes() == x.sizes() && d.scalar_type() == x.scalar_type(),
                "add_rms_norm: delta must match x");
    if (d.stride(1) != 1) d = d.contiguous();
  }
  at::Tensor y = at::empty({rows, n}, x.options());
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat)
    add_rms_norm_rows<float>(x.data_ptr<float>(), d.defined() ? d.data_ptr<float>() : nullptr,
                             w.data_ptr<float>(), y.data_ptr<float>(), rows, n, x.stride(0),
                             d.defined() ? d.stride(0) : 0, e);
  else if (x.scalar_type() == at::kBFloat16)
    add_rms_norm_rows<c10::BFloat16>(
        x.data_ptr<c10::BFloat16>(), d.defined() ? d.data_ptr<c10::BFloat16>() : nullptr,
        w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, n, x.stride(0),
        d.defined() ? d.stride(0) : 0, e);
  else
    TORCH_CHECK(false, "add_rms_norm: fp32 or bf16 only, got ", x.scalar_type());
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_mul: CPU tensors only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1,
              "silu_mul: gate_up [T, 2I], rows contiguous");
  const int64_t rows = gate_up.size(0), half = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, half}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat)
    silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, half,
                         gate_up.stride(0));
  else if (gate_up.scalar_type() == at::kBFloat16)
    silu_mul_rows<c10::BFloat16>(gate_up.data_ptr<c10::BFloat16>(),
                                 out.data_ptr<c10::BFloat16>(), rows, half, gate_up.stride(0));
  else
    TORCH_CHECK(false, "silu_mul: fp32 or bf16 only, got ", gate_up.scalar_type());
  return out;
}

void rope_(at::Tensor qk, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk.device().is_cpu(), "rope_: CPU tensors only");
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && qk.size(2) % 2 == 0,
              "rope_: qk [T, H, D] with D contiguous and even");
  const int64_t rows = qk.size(0), heads = qk.size(1), dim = qk.size(2);
  TORCH_CHECK(cos.numel() == rows * dim && sin.numel() == rows * dim,
              "rope_: cos and sin hold [T, D] values");
  TORCH_CHECK(cos.scalar_type() == qk.scalar_type() && sin.scalar_type() == qk.scalar_type(),
              "rope_: cos and sin must have qk's dtype");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  if (qk.scalar_type() == at::kFloat)
    rope_rows<float>(qk.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), rows, heads,
                     dim, qk.stride(0), qk.stride(1));
  else if (qk.scalar_type() == at::kBFloat16)
    rope_rows<c10::BFloat16>(qk.data_ptr<c10::BFloat16>(), c.data_ptr<c10::BFloat16>(),
                             s.data_ptr<c10::BFloat16>(), rows, heads, dim, qk.stride(0),
                             qk.stride(1));
  else
    TORCH_CHECK(false, "rope_: fp32 or bf16 only, got ", qk.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ecoserve, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_(Tensor(a!) qk, Tensor cos, Tensor sin) -> ()");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
  m.impl("rope_", c10::DispatchKey::CPU, TORCH_FN(rope_));
}
