// Native CPU kernel for the fused KL's per-chunk step: `align_ti::kl_chunk`.
//
// The op's schema and its default (PyTorch) implementation live in
// align_ti/ops/fused_kl.py; this file only overrides the CPU kernel through
// TORCH_LIBRARY_IMPL when the extension is loaded (align_ti/native.py).
//
// One fused sweep per row (rows spread over ATen's intra-op thread pool, i.e. OpenMP in
// the PyTorch wheels); a row of both models' fp32 logits (2 x 600 KB at V = 151936) is read
// from memory once and then stays in L2:
//   pass 1: log-sum-exp of z_S / T and z_T / T (and of the raw student logits over all Vs
//           columns for the CE when that differs), each in one streaming read: per L1-sized
//           block its max, then its sum of exps, blocks combined with a rescale;
//   pass 2: the divergence D (forward KL: also the gradient);
//   pass 3: (reverse, jsd) the gradient, which needs D (or KL(p_S || M)) first.
// The gradient is written in place over zs (zt is then scratch), or into g_out when given,
// and zs, zt are then only read: the logits driver hands fp32 logits rows straight in.
// fp32 arithmetic with fp64 block sums; exp is an inlined AVX-512 polynomial (~1 ulp) or
// ATen's exp_u20 elsewhere, log1p is ATen's (Sleef). The formulas are those of
// `_chunk_torch`, so NaN/inf inputs give NaN results as there.
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
#include <limits>
#include <tuple>

namespace {

using Vec = at::vec::Vectorized<float>;
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

// Load `cnt` (< kW) elements, the other lanes set to `fill`.
inline Vec load_tail(const float* p, int64_t cnt, float fill) {
  return Vec::set(Vec(fill), Vec::loadu(p, cnt), cnt);
}

// max over p[0, n)
float row_max(const float* p, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  Vec m0(ninf), m1(ninf);
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    m0 = at::vec::maximum(m0, Vec::loadu(p + j));
    m1 = at::vec::maximum(m1, Vec::loadu(p + j + kW));
  }
  for (; j + kW <= n; j += kW) m0 = at::vec::maximum(m0, Vec::loadu(p + j));
  if (j < n) m1 = at::vec::maximum(m1, load_tail(p + j, n - j, ninf));
  return hmax(at::vec::maximum(m0, m1));
}

// sum over p[0, n) of exp((p - m) * k)
double row_sumexp(const float* p, int64_t n, float m, float k) {
  const Vec vm(m), vk(k);
  double total = 0.0;
  int64_t j = 0;
  while (j + kW <= n) {
    const int64_t end = std::min(n - n % kW, j + kBlock);
    Vec acc(0.f);
    for (; j < end; j += kW) acc = acc + fexp((Vec::loadu(p + j) - vm) * vk);
    total += hsum(acc);
  }
  if (j < n) {
    const Vec x = load_tail(p + j, n - j, -std::numeric_limits<float>::infinity());
    total += hsum(fexp((x - vm) * vk));
  }
  return total;
}

// Log-sum-exp of p[0, n) * k (k > 0) in one streaming read: the row is visited in L1-sized
// blocks (max of the block, then its sum of exps while it is in L1), blocks are combined
// with one rescale each. Returns max * k + log(sum); NaN when the row holds NaN (or +inf).
constexpr int64_t kL1Block = 2048;

float row_lse(const float* p, int64_t n, float k) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = ninf;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kL1Block) {
    const int64_t len = std::min(kL1Block, n - b);
    const float bm = row_max(p + b, len);
    if (std::isnan(bm)) return bm;
    if (bm == ninf) continue;  // exp(-inf) = 0: the block adds nothing
    const double bs = row_sumexp(p + b, len, bm, k);
    if (bm > m) {
      total = total * std::exp(static_cast<double>(m - bm) * k) + bs;
      m = bm;
    } else {
      total += bs * std::exp(static_cast<double>(bm - m) * k);
    }
  }
  return m * k + static_cast<float>(std::log(total));
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

inline Vec ld(const float* p, int64_t cnt, float fill = 0.f) {
  return cnt == kW ? Vec::loadu(p) : load_tail(p, cnt, fill);
}

inline void st(const Vec& x, float* p, int64_t cnt) {
  if (cnt == kW) x.store(p);
  else x.store(p, static_cast<int>(cnt));
}

inline Vec keep(const Vec& x, int64_t cnt) {  // zero lanes >= cnt
  return cnt == kW ? x : Vec::set(Vec(0.f), x, cnt);
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
// goes (== s: in place, and then t is scratch; else s and t are only read); gce: [ns] split
// CE gradient or nullptr.
void kl_row(const float* s, float* t, float* gd, float* gce, const Opts& o, int64_t label,
            float a, float c, float* d_out, float* nll_out) {
  const int64_t v = o.v, ns = o.ns;
  const float inv_t = o.inv_t;
  const bool valid = o.has_ce && label != kIgnore;
  const float z_label = valid ? s[label] : 0.f;

  // pass 1: log-sum-exp of z_S / T and z_T / T over [0, v) (one streaming read each)
  const float lse_s = row_lse(s, v, inv_t);
  const float lse_t = row_lse(t, v, inv_t);
  // CE: log-sum-exp of the raw student logits over [0, ns) (shared when it is the same)
  const bool ce_shared = o.has_ce && inv_t == 1.f && ns == v;
  float lse_ce = 0.f;
  if (o.has_ce) {
    lse_ce = ce_shared ? lse_s : row_lse(s, ns, 1.f);
    *nll_out = valid ? -(z_label - lse_ce) : 0.f;
  }

  const bool grad = o.need_grad;
  const bool ce_grad = grad && o.has_ce;
  const float cc = valid ? c : 0.f;
  float gk_scale = o.div == 2 ? 1.f - o.beta : 1.f;
  const Vec vk(a * (inv_t * gk_scale)), vcc(cc), vinv(inv_t), vls(lse_s), vlt(lse_t),
      vlce(lse_ce);
  // CE gradient term exp(z - lse_ce) * cc for raw z (vector)
  auto ce_term = [&](const Vec& z) { return fexp(z - vlce) * vcc; };

  if (o.div == 0) {  // forward KL(p_T || p_S); gradient p_S - p_T in the same pass
    Acc acc;
    sweep(v, [&](int64_t j, int64_t cnt) {
      const Vec zs = ld(s + j, cnt), zt = ld(t + j, cnt);
      const Vec ls = at::vec::fmsub(zs, vinv, vls);
      const Vec lt = at::vec::fmsub(zt, vinv, vlt);
      const Vec pt = fexp(lt);
      acc.add(keep(pt * (lt - ls), cnt));
      if (grad) {
        const Vec ps = fexp(ls);
        Vec g = (ps - pt) * vk;
        if (ce_grad) {
          const Vec ce = ce_shared ? ps * vcc : ce_term(zs);
          if (o.split) st(ce, gce + j, cnt);
          else g = g + ce;
        }
        st(g, gd + j, cnt);
      }
    });
    *d_out = static_cast<float>(acc.get());
  } else if (o.div == 1) {  // reverse KL(p_S || p_T)
    Acc acc;
    sweep(v, [&](int64_t j, int64_t cnt) {
      const Vec ls = at::vec::fmsub(ld(s + j, cnt), vinv, vls);
      const Vec lt = at::vec::fmsub(ld(t + j, cnt), vinv, vlt);
      acc.add(keep(fexp(ls) * (ls - lt), cnt));
    });
    const float d = static_cast<float>(acc.get());
    *d_out = d;
    if (grad) {
      const Vec vd(d);
      sweep(v, [&](int64_t j, int64_t cnt) {
        const Vec zs = ld(s + j, cnt);
        const Vec ls = at::vec::fmsub(zs, vinv, vls);
        const Vec lt = at::vec::fmsub(ld(t + j, cnt), vinv, vlt);
        const Vec ps = fexp(ls);
        Vec g = ps * (ls - lt - vd) * vk;
        if (ce_grad) {
          const Vec ce = ce_shared ? ps * vcc : ce_term(zs);
          if (o.split) st(ce, gce + j, cnt);
          else g = g + ce;
        }
        st(g, gd + j, cnt);
      });
    }
  } else {  // jsd: beta KL(p_T || M) + (1 - beta) KL(p_S || M)
    const Vec vlb(std::log(o.beta)), vlb1(std::log1p(-o.beta));
    // log M is kept for the gradient pass in the gradient row (or, in place, over t)
    float* lm_buf = gd != s ? gd : t;
    Acc acc_t, acc_s;
    sweep(v, [&](int64_t j, int64_t cnt) {
      const Vec ls = at::vec::fmsub(ld(s + j, cnt), vinv, vls);
      const Vec lt = at::vec::fmsub(ld(t + j, cnt), vinv, vlt);
      // log M = logaddexp(lt + log beta, ls + log(1 - beta))
      const Vec x = lt + vlb, y = ls + vlb1;
      const Vec mx = at::vec::maximum(x, y);
      const Vec lm = mx + fexp(Vec(0.f) - (x - y).abs()).log1p();
      acc_t.add(keep(fexp(lt) * (lt - lm), cnt));
      acc_s.add(keep(fexp(ls) * (ls - lm), cnt));
      if (grad) st(lm, lm_buf + j, cnt);
    });
    const double dt = acc_t.get(), kls = acc_s.get();
    *d_out = static_cast<float>(o.beta * dt + (1.0 - o.beta) * kls);
    if (grad) {
      const Vec vkls(static_cast<float>(kls));
      sweep(v, [&](int64_t j, int64_t cnt) {
        const Vec zs = ld(s + j, cnt);
        const Vec ls = at::vec::fmsub(zs, vinv, vls);
        const Vec ps = fexp(ls);
        Vec g = ps * (ls - ld(lm_buf + j, cnt) - vkls) * vk;
        if (ce_grad) {
          const Vec ce = ce_shared ? ps * vcc : ce_term(zs);
          if (o.split) st(ce, gce + j, cnt);
          else g = g + ce;
        }
        st(g, gd + j, cnt);
      });
    }
  }
  if (!grad) return;
  // columns [v, ns): no divergence gradient; the CE term only
  if (ns > v) {
    sweep(ns - v, [&](int64_t j, int64_t cnt) {
      float* p = gd + v + j;
      if (ce_grad) {
        const Vec ce = ce_term(ld(s + v + j, cnt));
        if (o.split) {
          st(ce, gce + v + j, cnt);
          st(Vec(0.f), p, cnt);
        } else {
          st(ce, p, cnt);
        }
      } else {
        st(Vec(0.f), p, cnt);
      }
    });
  }
  if (ce_grad && valid) {
    if (o.split) gce[label] -= cc;
    else gd[label] -= cc;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_chunk_cpu(
    const at::Tensor& zs, const at::Tensor& zt, int64_t v, int64_t div_code, double beta,
    double inv_t, const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& a,
    const std::optional<at::Tensor>& c, bool need_grad, bool split,
    const std::optional<at::Tensor>& g_out) {
  TORCH_CHECK(zs.dim() == 2 && zt.dim() == 2, "kl_chunk: zs and zt must be 2-D, got ",
              zs.sizes(), " and ", zt.sizes());
  TORCH_CHECK(zs.scalar_type() == at::kFloat && zt.scalar_type() == at::kFloat,
              "kl_chunk: zs and zt must be float32 (the fp32 chunk buffers), got ",
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
  if (has_out) {
    TORCH_CHECK(g_out->scalar_type() == at::kFloat && g_out->dim() == 2 && g_out->size(0) == r &&
                    g_out->size(1) == ns && g_out->stride(1) == 1,
                "kl_chunk: g_out must be float32 [", r, ", ", ns, "] with contiguous rows, got ",
                g_out->scalar_type(), " ", g_out->sizes());
  }
  float* zs_p = zs.data_ptr<float>();
  float* g_p = has_out ? g_out->data_ptr<float>() : zs_p;
  const int64_t sg = has_out ? g_out->stride(0) : zs.stride(0);
  float* zt_p = zt.data_ptr<float>();
  const int64_t szs = zs.stride(0), szt = zt.stride(0);
  float* d_p = d.data_ptr<float>();
  float* nll_p = has_ce ? nll.data_ptr<float>() : nullptr;
  float* gce_p = want_gce ? gce.data_ptr<float>() : nullptr;
  const int64_t* lab_p = has_ce ? lab.data_ptr<int64_t>() : nullptr;
  const float* a_p = need_grad ? av.data_ptr<float>() : nullptr;
  const float* c_p = (need_grad && has_ce) ? cv.data_ptr<float>() : nullptr;
  if (has_ce) {
    for (int64_t i = 0; i < r; ++i) {
      const int64_t y = lab_p[i];
      TORCH_CHECK(y == kIgnore || (y >= 0 && y < ns), "kl_chunk: label ", y,
                  " out of range [0, ", ns, ")");
    }
  }
  at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float nll_i = 0.f;
      kl_row(zs_p + i * szs, zt_p + i * szt, g_p + i * sg, gce_p ? gce_p + i * ns : nullptr, o,
             has_ce ? lab_p[i] : kIgnore, a_p ? a_p[i] : 0.f, c_p ? c_p[i] : 0.f, d_p + i,
             &nll_i);
      if (nll_p) nll_p[i] = nll_i;
    }
  });
  return {d, nll, gce};
}

}  // namespace

TORCH_LIBRARY_IMPL(align_ti, CPU, m) {
  m.impl("kl_chunk", &kl_chunk_cpu);
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
