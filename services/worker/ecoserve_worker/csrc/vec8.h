// Portable 8-float vector code (GCC/Clang vector extensions) shared by the C++ kernels:
// paged_decode_tiles.h and fused_ops.cpp include it inside their anonymous namespaces.
// kernels.py hashes every file in csrc/ into the build's name.
#pragma once

// bf16 -> fp32 is a 16-bit shift: a plain loop the compiler vectorises.
inline const float* to_f32(const float* src, float*, int64_t) { return src; }

inline const float* to_f32(const c10::BFloat16* src, float* buf, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = static_cast<uint32_t>(s[i]) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &u, sizeof f);
    buf[i] = f;
  }
  return buf;
}

// 8 floats as one value (GCC/Clang vector extension): one AVX2 register, two SSE or NEON ones.
typedef float f8 __attribute__((vector_size(32)));
constexpr int L = 8;

inline f8 load8(const float* p) {
  f8 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store8(float* p, f8 x) { std::memcpy(p, &x, sizeof x); }

// exp of 8 floats, 2^n p(r), as paged_decode_tiles.h's exp16: x is clamped to [-87, 88]
// (e^-87 ~ 1e-38, e^88 ~ 1.7e38, both finite), so no input overflows 2^n's exponent field.
inline f8 exp8(f8 x) {
  typedef int32_t i8 __attribute__((vector_size(32)));
  const f8 lo = f8{} - 87.f, hi = f8{} + 88.f, magic = f8{} + 12582912.f;  // 1.5 * 2^23: adding it rounds
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f8 n = (x * 1.44269504f + magic) - magic;
  const f8 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  f8 p = r * (1.f / 720) + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;  // 2^n
  f8 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}
