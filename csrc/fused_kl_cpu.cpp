// Native CPU kernel for the fused KL's per-chunk step: `align_ti::kl_chunk` and
// `align_ti::kl_chunk_into` (the same step; the second only reads zs and zt).
//
// The op's schema and its default (PyTorch) implementation live in
// align_ti/ops/fused_kl/chunk_op.py; this file only overrides the CPU kernel through
// TORCH_LIBRARY_IMPL when the extension is loaded (align_ti/native.py).
//
// One fused sweep per row (rows spread over ATen's intra-op thread pool, i.e. OpenMP in
// the PyTorch wheels); a row of both models' logits (2 x 600 KB fp32, 2 x 300 KB bf16 at
// V = 151936) is read from memory once and then stays in L2:
//   pass 1: log-sum-exp of z_S / T and z_T / T (and of the raw student logits over all Vs
//           columns for the CE when that differs), each in one streaming read: per L1-sized
//           block its max, then its sum of exps, blocks combined with a rescale;
//   pass 2: the divergence D (forward KL: also the gradient);
//   pass 3: (reverse, jsd) the gradient, which needs D (or KL(p_S || M)) first.
// The gradient is written in place over zs (zt is then scratch), or into g_out when given,
// and zs, zt are then only read: the logits driver hands the logits rows straight in.
// Element types: zs and zt may each be float32, bfloat16 or float16 (the two may differ),
// converted to fp32 on load (exact); the gradient (g_out, or zs in place) is float32 or zs's
// dtype, rounded once at its store (round to nearest even, as torch's .to()). So bf16
// logits need no fp32 chunk copies. The JSD's log M row lives in the fp32 gradient row, the
// fp32 teacher row (in place), or else a per-thread fp32 buffer.
// fp32 arithmetic with fp64 block sums; exp is an inlined AVX-512 polynomial (~1 ulp) or
// ATen's exp_u20 elsewhere, log1p is ATen's (Sleef). The formulas are those of `chunk_torch`
// (align_ti/ops/fused_kl/chunk_torch.py), so NaN/inf inputs give NaN results as there. -inf
// logits are vocabulary masks with 0 log 0 = 0 (the rule of align_ti/reference/fused_kl.py):
// each product p (log p - log q) takes its difference only where p > 0 (`where_pos`), a mask
// per vector.
// at::vec picks its ISA from CPU_CAPABILITY_*; derive it from what the compiler targets
// (CMakeLists.txt compiles with -march=native by default).
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
using BF16 = c10::BFloat16;
using F16 = c10::Half;
constexpr int64_t kW = Vec::size();
constexpr int64_t kIgnore = -100;
// fp32 lanes are flushed into fp64 every kBlock elements (accuracy of long sums).
constexpr int64_t kBlock = 2048;

inline double hsum(const Vec& x) {
  float buf[kW];
  x.store(buf);
  double s = 0.0;
  for (int64_t i = 0; i < kW; ++i) s += buf[i];
  return s;
}

inline float hmax(const Vec& x) {  // propagates NaN, like at::vec::maximum
  float buf[kW];
  x.store(buf);
  float m = buf[0];
  for (int64_t i = 1; i < kW; ++i) m = (std::isnan(m) || m >= buf[i]) ? m : buf[i];
  return m;
}

// exp for the arguments met here (<= 0 up to rounding; -inf -> 0; NaN stays NaN).
#if defined(CPU_CAPABILITY_AVX512)
// Inlined AVX-512: n = round(x log2 e), r = x - n ln 2 (Cody-Waite), Cephes' degree-6
// polynomial for exp(r) (~1 ulp), scaled by 2^n with vscalefps (exact, no integer tricks).
// Results below FLT_MIN are flushed to 0 (no denormal assists); NaN passes through.
inline Vec fexp(const Vec& xv) {
  const __m512 x = xv;
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-88.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512 y = _mm512_scalef_ps(p, n);
  // keep lanes with x >= -87.33 (exp >= FLT_MIN) or NaN (unordered compare is true)
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_NLT_UQ);
  return _mm512_maskz_mov_ps(keep, y);
}
#else
// ATen's polynomial exp_u20 (<= 20 ulp), with NaN kept NaN (exp_u20 alone clamps it).
inline Vec fexp(const Vec& x) {
  return Vec::blendv(x.exp_u20(), x, x != x);
}
#endif

// ---- typed loads and stores: T in {float, BF16, F16}, fp32 lanes in registers ----------

// kW elements at p, converted to fp32 (exact for bf16 and fp16).
template <typename T>
inline Vec ldv(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, BF16>) {
      return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    } else {
      return Vec(_mm512_cvtph_ps(h));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, BF16>) {
      return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    } else {
#if defined(__F16C__)
      return Vec(_mm256_cvtph_ps(h));
#else
      float buf[kW];
      for (int64_t i = 0; i < kW; ++i) buf[i] = static_cast<float>(p[i]);
      return Vec::loadu(buf);
#endif
    }
#else
    float buf[kW];
    for (int64_t i = 0; i < kW; ++i) buf[i] = static_cast<float>(p[i]);
    return Vec::loadu(buf);
#endif
  }
}

// Load `cnt` (< kW) elements, the other lanes set to `fill`.
template <typename T>
inline Vec load_tail(const T* p, int64_t cnt, float fill) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::set(Vec(fill), Vec::loadu(p, cnt), cnt);
  } else {
    float buf[kW];
    for (int64_t i = 0; i < kW; ++i) buf[i] = i < cnt ? static_cast<float>(p[i]) : fill;
    return Vec::loadu(buf);
  }
}

// Store kW fp32 lanes as T (bf16: round to nearest even, NaN stays NaN, like c10::BFloat16).
template <typename T>
inline void stv(const Vec& x, T* p) {
  if constexpr (std::is_same_v<T, float>) {
    x.store(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 xf = x;
    if constexpr (std::is_same_v<T, BF16>) {
      const __m512i u = _mm512_castps_si512(xf);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(
          _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(xf, xf, _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_cvtps_ph(xf, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return;
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 xf = x;
    if constexpr (std::is_same_v<T, BF16>) {
      const __m256i u = _mm256_castps_si256(xf);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(
          _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      const __m256 nan = _mm256_cmp_ps(xf, xf, _CMP_UNORD_Q);
      r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                               _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r),
                                              _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
      return;
    }
#if defined(__F16C__)
    else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                       _mm256_cvtps_ph(xf, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    }
#endif
#endif
    float buf[kW];
    x.store(buf);
    for (int64_t i = 0; i < kW; ++i) p[i] = T(buf[i]);
  }
}

// Store the first `cnt` (< kW) lanes as T.
template <typename T>
inline void st_tail(const Vec& x, T* p, int64_t cnt) {
  if constexpr (std::is_same_v<T, float>) {
    x.store(p, static_cast<int>(cnt));
  } else {
    float buf[kW];
    x.store(buf);
    for (int64_t i = 0; i < cnt; ++i) p[i] = T(buf[i]);
  }
}

// max over p[0, n)
template <typename T>
float row_max(const T* p, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  Vec m0(ninf), m1(ninf);
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    m0 = at::vec::maximum(m0, ldv(p + j));
    m1 = at::vec::maximum(m1, ldv(p + j + kW));
  }
  for (; j + kW <= n; j += kW) m0 = at::vec::maximum(m0, ldv(p + j));
  if (j < n) m1 = at::vec::maximum(m1, load_tail(p + j, n - j, ninf));
  return hmax(at::vec::maximum(m0, m1));
}

// sum over p[0, n) of exp((p - m) * k)
template <typename T>
double row_sumexp(const T* p, int64_t n, float m, float k) {
  const Vec vm(m), vk(k);
  double total = 0.0;
  int64_t j = 0;
  while (j + kW <= n) {
    const int64_t end = std::min(n - n % kW, j + kBlock);
    Vec acc(0.f);
    for (; j < end; j += kW) acc = acc + fexp((ldv(p + j) - vm) * vk);
    total += hsum(acc);
  }
  if (j < n) {
    const Vec x = load_tail(p + j, n - j, -std::numeric_limits<float>::infinity());
    total += hsum(fexp((x - vm) * vk));
  }
  return total;
}

// A log-sum-exp kept as shift + log_sum (shift = max * k). Apart, z * k - shift is exact
// near the max and log_sum <= log n is small, so (z * k - shift) - log_sum keeps a
// log-probability's precision; z * k - (shift + log_sum) rounds the lse at the logits' size
// (3e-5 at logits of 300), and the divergence of two close distributions lost all of it.
struct Lse {
  float shift, log_sum;
  float value() const { return shift + log_sum; }
};

// Log-sum-exp of p[0, n) * k (k > 0) in one streaming read: the row is visited in L1-sized
// blocks (max of the block, then its sum of exps while it is in L1), blocks are combined
// with one rescale each. NaN when the row holds NaN (or +inf).
constexpr int64_t kL1Block = 2048;

template <typename T>
Lse row_lse(const T* p, int64_t n, float k) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = ninf;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kL1Block) {
    const int64_t len = std::min(kL1Block, n - b);
    const float bm = row_max(p + b, len);
    if (std::isnan(bm)) return {bm, bm};
    if (bm == ninf) continue;  // exp(-inf) = 0: the block adds nothing
    const double bs = row_sumexp(p + b, len, bm, k);
    if (bm > m) {
      total = total * std::exp(static_cast<double>(m - bm) * k) + bs;
      m = bm;
    } else {
      total += bs * std::exp(static_cast<double>(bm - m) * k);
    }
  }
  return {m * k, static_cast<float>(std::log(total))};
}

struct Opts {
  int64_t v, ns;
  int64_t div;
  float beta, inv_t;
  bool need_grad, split, has_ce;
};

// A generic vectorised sweep over [0, n): body(j, cnt) with cnt = kW or the tail count.
template <typename F>
inline void sweep(int64_t n, F&& body) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) body(j, kW);
  if (j < n) body(j, n - j);
}

template <typename T>
inline Vec ld(const T* p, int64_t cnt, float fill = 0.f) {
  return cnt == kW ? ldv(p) : load_tail(p, cnt, fill);
}

template <typename T>
inline void st(const Vec& x, T* p, int64_t cnt) {
  if (cnt == kW) stv(x, p);
  else st_tail(x, p, cnt);
}

inline Vec keep(const Vec& x, int64_t cnt) {  // zero lanes >= cnt
  return cnt == kW ? x : Vec::set(Vec(0.f), x, cnt);
}

// x where p > 0, else 0: p * where_pos(p, log p - log q) is 0 at a column of p == 0 whatever
// log q is (0 log 0 = 0: no 0 * -inf), +inf where p > 0 == q, and NaN where p is NaN.
inline Vec where_pos(const Vec& p, const Vec& x) {
  return x & (p > Vec(0.f));
}

// Block accumulator: fp32 lanes flushed into fp64 every kBlock elements.
struct Acc {
  Vec lanes{0.f};
  int64_t n = 0;
  double total = 0.0;
  inline void add(const Vec& x) {
    lanes = lanes + x;
    if (++n == kBlock / kW) flush();
  }
  inline void flush() {
    total += hsum(lanes);
    lanes = Vec(0.f);
    n = 0;
  }
  double get() {
    flush();
    return total;
  }
};

// One row. s: [ns] raw student logits; t: [v] raw teacher logits; gd: [ns] where the gradient
// goes (== s: in place; else s and t are only read); gce: [ns] split CE gradient (fp32) or
// nullptr; lm: [v] fp32 scratch for the JSD's log M (may be t, or gd when it is fp32 and not
// s). The gradient is computed in fp32 and rounded to G once, at its store.
template <typename TS, typename TT, typename G>
void kl_row(const TS* s, const TT* t, G* gd, float* gce, float* lm, const Opts& o,
            int64_t label, float a, float c, float* d_out, float* nll_out) {
  const int64_t v = o.v, ns = o.ns;
  const float inv_t = o.inv_t;
  const bool valid = o.has_ce && label != kIgnore;
  const float z_label = valid ? static_cast<float>(s[label]) : 0.f;

  // pass 1: log-sum-exp of z_S / T and z_T / T over [0, v) (one streaming read each)
  const Lse lse_s = row_lse(s, v, inv_t);
  const Lse lse_t = row_lse(t, v, inv_t);
  // CE: log-sum-exp of the raw student logits over [0, ns) (shared when it is the same)
  const bool ce_shared = o.has_ce && inv_t == 1.f && ns == v;
  float lse_ce = 0.f;
  if (o.has_ce) {
    lse_ce = (ce_shared ? lse_s : row_lse(s, ns, 1.f)).value();
    *nll_out = valid ? -(z_label - lse_ce) : 0.f;
  }

  const bool grad = o.need_grad;
  const bool ce_grad = grad && o.has_ce;
  const float cc = valid ? c : 0.f;
  float gk_scale = o.div == 2 ? 1.f - o.beta : 1.f;
  const Vec vk(a * (inv_t * gk_scale)), vcc(cc), vinv(inv_t), vlce(lse_ce);
  // a row of weight 0 gets exactly 0 from the divergence, also where its terms are NaN (a row
  // without a distribution: 0 * NaN would be NaN), as in the Triton kernel and the PyTorch path
  const bool kl_grad = a != 0.f;
  const Vec vss(lse_s.shift), vgs(lse_s.log_sum), vst(lse_t.shift), vgt(lse_t.log_sum);
  // log p_S and log p_T of raw logits z (see Lse)
  auto log_ps = [&](const Vec& z) { return at::vec::fmsub(z, vinv, vss) - vgs; };
  auto log_pt = [&](const Vec& z) { return at::vec::fmsub(z, vinv, vst) - vgt; };
  // CE gradient term exp(z - lse_ce) * cc for raw z (vector)
  auto ce_term = [&](const Vec& z) { return fexp(z - vlce) * vcc; };
  // the one-hot part of the CE gradient (-cc at the label) goes into the split CE gradient
  // after the sweeps; unsplit, into the gradient lanes before they are rounded and stored
  const bool fix_label = ce_grad && valid && !o.split;
  auto emit = [&](Vec g, int64_t j, int64_t cnt) {  // store gradient lanes [j, j + cnt)
    if (fix_label && static_cast<uint64_t>(label - j) < static_cast<uint64_t>(cnt)) {
      float buf[kW];
      g.store(buf);
      buf[label - j] -= cc;
      g = Vec::loadu(buf);
    }
    st(g, gd + j, cnt);
  };

  if (o.div == 0) {  // forward KL(p_T || p_S); gradient p_S - p_T in the same pass
    Acc acc;
    sweep(v, [&](int64_t j, int64_t cnt) {
      const Vec zs = ld(s + j, cnt), zt = ld(t + j, cnt);
      const Vec ls = log_ps(zs);
      const Vec lt = log_pt(zt);
      const Vec pt = fexp(lt);
      acc.add(keep(pt * where_pos(pt, lt - ls), cnt));
      if (grad) {
        const Vec ps = fexp(ls);
        Vec g = kl_grad ? (ps - pt) * vk : Vec(0.f);
        if (ce_grad) {
          const Vec ce = ce_shared ? ps * vcc : ce_term(zs);
          if (o.split) st(ce, gce + j, cnt);
          else g = g + ce;
        }
        emit(g, j, cnt);
      }
    });
    *d_out = static_cast<float>(acc.get());
  } else if (o.div == 1) {  // reverse KL(p_S || p_T)
    Acc acc;
    sweep(v, [&](int64_t j, int64_t cnt) {
      const Vec ls = log_ps(ld(s + j, cnt));
      const Vec lt = log_pt(ld(t + j, cnt));
      const Vec ps = fexp(ls);
      acc.add(keep(ps * where_pos(ps, ls - lt), cnt));
    });
    const float d = static_cast<float>(acc.get());
    *d_out = d;
    if (grad) {
      // p_S (log p_S - log p_T - D) with the +inf parts (columns that only the teacher masks,
      // and D then) as 0: finite, so a row of weight 0 gets exactly 0, as in `_gradient_core`
      const Vec vd(d == std::numeric_limits<float>::infinity() ? 0.f : d);
      const Vec ninf(-std::numeric_limits<float>::infinity());
      sweep(v, [&](int64_t j, int64_t cnt) {
        const Vec zs = ld(s + j, cnt);
        const Vec ls = log_ps(zs);
        const Vec lt = log_pt(ld(t + j, cnt));
        const Vec ps = fexp(ls);
        Vec g = kl_grad ? ps * ((where_pos(ps, ls - lt) & (lt != ninf)) - vd) * vk : Vec(0.f);
        if (ce_grad) {
          const Vec ce = ce_shared ? ps * vcc : ce_term(zs);
          if (o.split) st(ce, gce + j, cnt);
          else g = g + ce;
        }
        emit(g, j, cnt);
      });
    }
  } else {  // jsd: beta KL(p_T || M) + (1 - beta) KL(p_S || M)
    const Vec vlb(std::log(o.beta)), vlb1(std::log1p(-o.beta));
    // log M is kept for the gradient pass in the fp32 row `lm`
    Acc acc_t, acc_s;
    sweep(v, [&](int64_t j, int64_t cnt) {
      const Vec ls = log_ps(ld(s + j, cnt));
      const Vec lt = log_pt(ld(t + j, cnt));
      // log M = logaddexp(lt + log beta, ls + log(1 - beta))
      const Vec x = lt + vlb, y = ls + vlb1;
      const Vec mx = at::vec::maximum(x, y);
      const Vec lmv = mx + fexp(Vec(0.f) - (x - y).abs()).log1p();
      const Vec pt = fexp(lt), ps = fexp(ls);
      acc_t.add(keep(pt * where_pos(pt, lt - lmv), cnt));
      acc_s.add(keep(ps * where_pos(ps, ls - lmv), cnt));
      if (grad) st(lmv, lm + j, cnt);
    });
    const double dt = acc_t.get(), kls = acc_s.get();
    *d_out = static_cast<float>(o.beta * dt + (1.0 - o.beta) * kls);
    if (grad) {
      const Vec vkls(static_cast<float>(kls));
      sweep(v, [&](int64_t j, int64_t cnt) {
        const Vec zs = ld(s + j, cnt);
        const Vec ls = log_ps(zs);
        const Vec ps = fexp(ls);
        Vec g = kl_grad ? ps * (where_pos(ps, ls - ld(lm + j, cnt)) - vkls) * vk : Vec(0.f);
        if (ce_grad) {
          const Vec ce = ce_shared ? ps * vcc : ce_term(zs);
          if (o.split) st(ce, gce + j, cnt);
          else g = g + ce;
        }
        emit(g, j, cnt);
      });
    }
  }
  if (!grad) return;
  // columns [v, ns): no divergence gradient; the CE term only
  if (ns > v) {
    sweep(ns - v, [&](int64_t j, int64_t cnt) {
      if (ce_grad) {
        const Vec ce = ce_term(ld(s + v + j, cnt));
        if (o.split) {
          st(ce, gce + v + j, cnt);
          st(Vec(0.f), gd + v + j, cnt);
        } else {
          emit(ce, v + j, cnt);
        }
      } else {
        st(Vec(0.f), gd + v + j, cnt);
      }
    });
  }
  if (ce_grad && valid && o.split) gce[label] -= cc;
}

// Everything kl_row needs besides the element types.
struct Rows {
  const void* zs;
  const void* zt;
  void* g;
  int64_t szs, szt, sg;  // row strides (elements)
  bool in_place;         // g == zs (then zt is scratch too)
  float* gce;
  float* d;
  float* nll;
  const int64_t* lab;
  const float* a;
  const float* c;
  int64_t r;
};

template <typename TS, typename TT, typename G>
void run_rows(const Rows& p, const Opts& o) {
  const TS* zs = static_cast<const TS*>(p.zs);
  const TT* zt = static_cast<const TT*>(p.zt);
  G* g = static_cast<G*>(p.g);
  const int64_t ns = o.ns;
  // where the JSD keeps log M: the fp32 gradient row when it is not the input, the fp32
  // teacher row when in place (scratch then), else a per-thread buffer
  const bool jsd_grad = o.div == 2 && o.need_grad;
  const bool lm_in_g = std::is_same_v<G, float> && !p.in_place;
  const bool lm_in_t = std::is_same_v<TT, float> && p.in_place;
  const bool lm_scratch = jsd_grad && !lm_in_g && !lm_in_t;
  at::parallel_for(0, p.r, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(lm_scratch ? o.v : 0);
    for (int64_t i = begin; i < end; ++i) {
      G* gi = p.in_place ? reinterpret_cast<G*>(const_cast<TS*>(zs + i * p.szs)) : g + i * p.sg;
      float* lm = nullptr;
      if (jsd_grad) {
        if (lm_in_g) lm = reinterpret_cast<float*>(gi);
        else if (lm_in_t) lm = reinterpret_cast<float*>(const_cast<TT*>(zt + i * p.szt));
        else lm = scratch.data();
      }
      float nll_i = 0.f;
      kl_row<TS, TT, G>(zs + i * p.szs, zt + i * p.szt, gi, p.gce ? p.gce + i * ns : nullptr, lm, o,
                        p.lab ? p.lab[i] : kIgnore, p.a ? p.a[i] : 0.f, p.c ? p.c[i] : 0.f,
                        p.d + i, &nll_i);
      if (p.nll) p.nll[i] = nll_i;
    }
  });
}

template <typename TS, typename TT>
void dispatch_g(at::ScalarType gt, const Rows& p, const Opts& o) {
  if (gt == at::kFloat) run_rows<TS, TT, float>(p, o);
  else run_rows<TS, TT, TS>(p, o);  // gt == zs's dtype (checked)
}

template <typename TS>
void dispatch_tt(at::ScalarType tt, at::ScalarType gt, const Rows& p, const Opts& o) {
  switch (tt) {
    case at::kFloat: return dispatch_g<TS, float>(gt, p, o);
    case at::kBFloat16: return dispatch_g<TS, BF16>(gt, p, o);
    default: return dispatch_g<TS, F16>(gt, p, o);
  }
}

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_chunk_cpu(
    const at::Tensor& zs, const at::Tensor& zt, int64_t v, int64_t div_code, double beta,
    double inv_t, const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& a,
    const std::optional<at::Tensor>& c, bool need_grad, bool split,
    const std::optional<at::Tensor>& g_out) {
  TORCH_CHECK(zs.dim() == 2 && zt.dim() == 2, "kl_chunk: zs and zt must be 2-D, got ",
              zs.sizes(), " and ", zt.sizes());
  TORCH_CHECK(supported(zs.scalar_type()) && supported(zt.scalar_type()),
              "kl_chunk: zs and zt must be float32, bfloat16 or float16, got ",
              zs.scalar_type(), " and ", zt.scalar_type());
  TORCH_CHECK(zs.stride(1) == 1 && zt.stride(1) == 1, "kl_chunk: rows must be contiguous");
  const int64_t r = zs.size(0), ns = zs.size(1);
  TORCH_CHECK(zt.size(0) == r && zt.size(1) >= v && ns >= v && v >= 1,
              "kl_chunk: bad shapes zs ", zs.sizes(), " zt ", zt.sizes(), " v ", v);
  TORCH_CHECK(div_code >= 0 && div_code <= 2, "kl_chunk: div_code must be 0, 1 or 2");
  const bool has_ce = labels.has_value() && labels->defined();
  Opts o{v, ns, div_code, static_cast<float>(beta), static_cast<float>(inv_t), need_grad,
         split, has_ce};
  auto f32 = zs.options().dtype(at::kFloat);
  at::Tensor d = at::empty({r}, f32);
  at::Tensor nll = has_ce ? at::empty({r}, f32) : at::empty({0}, f32);
  const bool want_gce = need_grad && has_ce && split;
  at::Tensor gce = want_gce ? at::empty({r, ns}, f32) : at::empty({0}, f32);

  at::Tensor lab, av, cv;
  if (has_ce) {
    lab = labels->to(at::kLong).contiguous();
    TORCH_CHECK(lab.numel() == r, "kl_chunk: labels must have ", r, " entries");
  }
  if (need_grad) {
    TORCH_CHECK(a.has_value() && a->defined() && a->numel() == r,
                "kl_chunk: need_grad needs a [r] coefficient tensor a");
    av = a->to(at::kFloat).contiguous();
    if (has_ce) {
      TORCH_CHECK(c.has_value() && c->defined() && c->numel() == r,
                  "kl_chunk: need_grad with labels needs a [r] coefficient tensor c");
      cv = c->to(at::kFloat).contiguous();
    }
  }
  const bool has_out = need_grad && g_out.has_value() && g_out->defined();
  at::ScalarType gt = zs.scalar_type();
  if (has_out) {
    gt = g_out->scalar_type();
    TORCH_CHECK((gt == at::kFloat || gt == zs.scalar_type()) && g_out->dim() == 2 &&
                    g_out->size(0) == r && g_out->size(1) == ns && g_out->stride(1) == 1,
                "kl_chunk: g_out must be float32 or zs's dtype (", zs.scalar_type(), "), [", r,
                ", ", ns, "] with contiguous rows, got ", g_out->scalar_type(), " ",
                g_out->sizes());
  }
  Rows p{};
  p.zs = zs.data_ptr();
  p.zt = zt.data_ptr();
  p.in_place = !has_out;
  p.g = has_out ? g_out->data_ptr() : zs.data_ptr();
  p.szs = zs.stride(0);
  p.szt = zt.stride(0);
  p.sg = has_out ? g_out->stride(0) : zs.stride(0);
  p.d = d.data_ptr<float>();
  p.nll = has_ce ? nll.data_ptr<float>() : nullptr;
  p.gce = want_gce ? gce.data_ptr<float>() : nullptr;
  p.lab = has_ce ? lab.data_ptr<int64_t>() : nullptr;
  p.a = need_grad ? av.data_ptr<float>() : nullptr;
  p.c = (need_grad && has_ce) ? cv.data_ptr<float>() : nullptr;
  p.r = r;
  if (has_ce) {
    for (int64_t i = 0; i < r; ++i) {
      const int64_t y = p.lab[i];
      TORCH_CHECK(y == kIgnore || (y >= 0 && y < ns), "kl_chunk: label ", y,
                  " out of range [0, ", ns, ")");
    }
  }
  switch (zs.scalar_type()) {
    case at::kFloat: dispatch_tt<float>(zt.scalar_type(), gt, p, o); break;
    case at::kBFloat16: dispatch_tt<BF16>(zt.scalar_type(), gt, p, o); break;
    default: dispatch_tt<F16>(zt.scalar_type(), gt, p, o); break;
  }
  return {d, nll, gce};
}

}  // namespace

TORCH_LIBRARY_IMPL(align_ti, CPU, m) {
  m.impl("kl_chunk", &kl_chunk_cpu);
  m.impl("kl_chunk_into", &kl_chunk_cpu);  // same signature; zs, zt only read (g_out given)
}

// Lets align_ti/native.py check which ISA the build vectorised for.
extern "C" __attribute__((visibility("default"))) const char* align_ti_native_info() {
#if defined(CPU_CAPABILITY_AVX512)
  return "at::vec AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "at::vec AVX2";
#else
  return "at::vec default";
#endif
}
