// The tiles of paged_decode.cpp: scoring up to TILE tokens of one (row, kv head) task against
// its G query heads and folding them into the online softmax. Included by paged_decode.cpp
// only (inside its anonymous namespace); kernels.py hashes both files into the build's name.
#pragma once

#include "vec8.h"  // f8, L, load8, store8, exp8, to_f32


constexpr int64_t TILE = 16;  // tokens scored together (one AVX-512 vector of scores)
static_assert(TILE % 8 == 0, "the generic tile's exp runs 8 scores at a time");
constexpr int64_t AHEAD = 2;  // blocks prefetched ahead of the one being read

// One task's working memory; every array starts on a 64-byte line.
struct Scratch {
  float* q;        // [G, D] the query heads in fp32 (not scaled)
  uint16_t* qb;    // [G, D] their bf16 bits (bf16 inputs)
  float* acc;      // [G, D] sum of p * V under the running max
  float* s;        // [G, TILE] a tile's scores, then its exp(score - max)
  float* m;        // [G] running max of the scores
  float* l;        // [G] running sum of exp(score - max)
  float* corr;     // [G] exp(old max - new max) of the latest tile
  float* cvt;      // [TILE, D] fp32 copy of K or V rows (generic tile)
  const char* next_k = nullptr;  // K and V rows to prefetch while a tile is read, or nullptr
  const char* next_v = nullptr;
};

// ---- generic tile: portable vector code (vec8.h) ---------------------------------------------

inline float dot(const float* a, const float* b, int64_t n) {
  f8 acc = {0, 0, 0, 0, 0, 0, 0, 0}, acc1 = acc;  // two chains: FMA latency, not throughput
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc += load8(a + i) * load8(b + i);
    acc1 += load8(a + i + L) * load8(b + i + L);
  }
  if (i + L <= n) acc += load8(a + i) * load8(b + i), i += L;
  acc += acc1;
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename scalar_t>
void tile_generic(const scalar_t* k, const scalar_t* v, int64_t n, int64_t G, int64_t D,
                  float scale, const Scratch& w) {
  const float* kf = to_f32(k, w.cvt, n * D);
  for (int64_t g = 0; g < G; ++g) {
    float* s = w.s + g * TILE;
    float mx = w.m[g];
    for (int64_t t = 0; t < n; ++t) {
      s[t] = dot(w.q + g * D, kf + t * D, D) * scale;
      mx = std::max(mx, s[t]);
    }
    w.corr[g] = std::exp(w.m[g] - mx);
    for (int64_t t = 0; t < n; t += L) store8(s + t, exp8(load8(s + t) - mx));  // TILE % L == 0
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) sum += s[t];
    w.l[g] = w.l[g] * w.corr[g] + sum;
    w.m[g] = mx;
  }
  const float* vf = to_f32(v, w.cvt, n * D);
  for (int64_t g = 0; g < G; ++g) {  // acc = corr acc + p V, L columns at a time in registers
    float* a = w.acc + g * D;
    const float* p = w.s + g * TILE;
    int64_t d = 0;
    for (; d + 4 * L <= D; d += 4 * L) {  // four independent FMA chains
      f8 r[4];
      for (int i = 0; i < 4; ++i) r[i] = load8(a + d + i * L) * w.corr[g];
      for (int64_t t = 0; t < n; ++t)
        for (int i = 0; i < 4; ++i) r[i] += p[t] * load8(vf + t * D + d + i * L);
      for (int i = 0; i < 4; ++i) store8(a + d + i * L, r[i]);
    }
    for (; d + L <= D; d += L) {
      f8 r = load8(a + d) * w.corr[g];
      for (int64_t t = 0; t < n; ++t) r += p[t] * load8(vf + t * D + d);
      store8(a + d, r);
    }
    for (; d < D; ++d) {
      float r = a[d] * w.corr[g];
      for (int64_t t = 0; t < n; ++t) r += p[t] * vf[t * D + d];
      a[d] = r;
    }
  }
}

// ---- AVX-512 tile: D = 16 J ------------------------------------------------------------------

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp of 16 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial (a few ulp).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Lane t of the result: the sum of the 16 lanes of v[t] (16 horizontal sums for ~3).
inline __m512 hsum16(const __m512* v) {
  __m512 r[4];
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: partial sums of v[4i .. 4i + 3]
    const __m512* x = v + 4 * i;
    const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    r[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  const __m512 s0 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], 0x88),
                                  _mm512_shuffle_f32x4(r[0], r[1], 0xDD));
  const __m512 s1 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], 0x88),
                                  _mm512_shuffle_f32x4(r[2], r[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s0, s1, 0x88), _mm512_shuffle_f32x4(s0, s1, 0xDD));
}

// Raw scores q_g . k_t of the tile's tokens (lanes >= n: 0).
template <typename scalar_t, int J>
inline __m512 scores(const scalar_t* k, int64_t n, int64_t g, const Scratch& w) {
  constexpr int64_t D = 16 * J;
  __m512 part[TILE];
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && J % 2 == 0) {
    // bf16 x bf16 products are exact in fp32: vdpbf16ps sums pairs of them, no conversion.
    __m512i qv[J / 2];
    for (int j = 0; j < J / 2; ++j) qv[j] = _mm512_load_si512(w.qb + g * D + 32 * j);
    for (int t = 0; t < TILE; ++t) {
      part[t] = _mm512_setzero_ps();
      if (t < n)
        for (int j = 0; j < J / 2; ++j)
          part[t] = _mm512_dpbf16_ps(part[t], (__m512bh)qv[j],
                                     (__m512bh)_mm512_loadu_si512(k + t * D + 32 * j));
    }
    return hsum16(part);
  }
#endif
  __m512 qv[J];
  for (int j = 0; j < J; ++j) qv[j] = _mm512_load_ps(w.q + g * D + 16 * j);
  for (int t = 0; t < TILE; ++t) {
    part[t] = _mm512_setzero_ps();
    if (t < n)
      for (int j = 0; j < J; ++j)
        part[t] = _mm512_fmadd_ps(qv[j], load16(k + t * D + 16 * j), part[t]);
  }
  return hsum16(part);
}

template <typename scalar_t, int J>
void tile_avx512(const scalar_t* k, const scalar_t* v, int64_t n, int64_t G, float scale,
                 const Scratch& w) {
  constexpr int64_t D = 16 * J;
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  for (int64_t g = 0; g < G; ++g) {
    const __m512 sv = _mm512_mul_ps(scores<scalar_t, J>(k, n, g, w), _mm512_set1_ps(scale));
    const float mx = std::max(w.m[g], _mm512_mask_reduce_max_ps(valid, sv));
    w.corr[g] = std::exp(w.m[g] - mx);
    const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(mx))));
    w.l[g] = w.l[g] * w.corr[g] + _mm512_reduce_add_ps(p);
    w.m[g] = mx;
    _mm512_store_ps(w.s + g * TILE, p);
  }
  // acc += p V: GB query heads at a time, their accumulators in registers, each V row
  // converted once for all of them.
  constexpr int GB = J >= 16 ? 1 : std::max(1, 16 / J);
  for (int64_t g0 = 0; g0 < G; g0 += GB) {
    const int64_t gb = std::min<int64_t>(GB, G - g0);
    __m512 a[GB][J];
    for (int i = 0; i < GB; ++i) {
      const __m512 c = _mm512_set1_ps(i < gb ? w.corr[g0 + i] : 0.f);
      for (int j = 0; j < J; ++j)
        a[i][j] = i < gb ? _mm512_mul_ps(_mm512_load_ps(w.acc + (g0 + i) * D + 16 * j), c)
                         : _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < n; ++t) {
      if (w.next_k && g0 == 0) {  // row t of the next block
        constexpr int64_t row = D * sizeof(scalar_t);
        for (int64_t off = 0; off < row; off += 64) {
          __builtin_prefetch(w.next_k + t * row + off);
          __builtin_prefetch(w.next_v + t * row + off);
        }
      }
      __m512 vr[J];
      for (int j = 0; j < J; ++j) vr[j] = load16(v + t * D + 16 * j);
      for (int i = 0; i < GB; ++i) {
        if (i >= gb) break;
        const __m512 p = _mm512_set1_ps(w.s[(g0 + i) * TILE + t]);
        for (int j = 0; j < J; ++j) a[i][j] = _mm512_fmadd_ps(p, vr[j], a[i][j]);
      }
    }
    for (int i = 0; i < GB && i < gb; ++i)
      for (int j = 0; j < J; ++j) _mm512_store_ps(w.acc + (g0 + i) * D + 16 * j, a[i][j]);
  }
}
#endif

template <typename scalar_t>
using TileFn = void (*)(const scalar_t*, const scalar_t*, int64_t, int64_t, float, const Scratch&);

// The AVX-512 tile for this head dim, or nullptr (then the generic one).
template <typename scalar_t>
TileFn<scalar_t> pick_tile(int64_t D) {
#if defined(__AVX512F__)
  switch (D) {
    case 32: return tile_avx512<scalar_t, 2>;
    case 64: return tile_avx512<scalar_t, 4>;
    case 80: return tile_avx512<scalar_t, 5>;
    case 96: return tile_avx512<scalar_t, 6>;
    case 128: return tile_avx512<scalar_t, 8>;
    case 256: return tile_avx512<scalar_t, 16>;
    default: break;
  }
#endif
  (void)D;
  return nullptr;
}

