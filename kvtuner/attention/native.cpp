// One decode step of one layer's attention over a kvtuner layer as it is held, on the CPU:
// full-precision sinks, packed stores (per-token groups, or KIVI per-channel key blocks) and a
// full-precision residual. Built and loaded by kvtuner/attention/native.py; the pure-torch
// kvtuner.attention.kernels.decode_layer computes the same thing and is the reference.
//
// Work is cut into items of at most CHUNK tokens of one (batch row, KV head) and one part (sinks,
// stored, residual), run in parallel on torch's intra-op threads. Each item dequantizes its rows
// into a small float buffer (codes * scale + zero, as the dequantizing path does), scores them
// against the query heads of its KV head, and keeps an online-softmax partial (max, sum of
// exponentials, weighted value sum); partials are merged at the end (flash-decoding). The
// workspace is O(CHUNK) per thread plus one partial per item: never O(context) floats per head.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 128;  // tokens per work item
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// 16 floats: the fast path's unit along head_dim. With AVX-512 one register; otherwise a pair of
// 8-lane vectors, because GCC has no register mode for a 64-byte vector without AVX-512 and keeps
// such a vector in memory, every operation a load and a store (on an AVX2 Zen 3, one SmolLM2 layer
// at 8000 tokens took 1.77 ms that way and 0.61 ms as a pair, 2 threads). The code below uses only
// the operators and helpers defined here, so both forms compile from it.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline vi16 to_int(v16 x) { return __builtin_convertvector(x, vi16); }
inline v16 to_float(vi16 x) { return __builtin_convertvector(x, v16); }
inline v16 zero_below(v16 x, float limit, v16 y) { return x < limit ? v16{} : y; }
inline v16 at_least(v16 x, float limit) { return x < limit ? v16{} + limit : x; }
inline v8 halves(v16 v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
#else
template <typename V>
struct Pair {
  V lo, hi;
};
typedef Pair<v8> v16;
typedef Pair<vi8> vi16;

#define KVTUNER_PAIR_OP(op)                                                              \
  template <typename V>                                                                  \
  inline Pair<V> operator op(Pair<V> a, Pair<V> b) {                                     \
    return {a.lo op b.lo, a.hi op b.hi};                                                 \
  }                                                                                      \
  template <typename V, typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>> \
  inline Pair<V> operator op(Pair<V> a, S s) {                                           \
    return {a.lo op s, a.hi op s};                                                       \
  }                                                                                      \
  template <typename V, typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>> \
  inline Pair<V> operator op(S s, Pair<V> a) {                                           \
    return {s op a.lo, s op a.hi};                                                       \
  }                                                                                      \
  template <typename V, typename W>                                                      \
  inline Pair<V>& operator op##=(Pair<V>& a, W b) {                                      \
    return a = a op b;                                                                   \
  }
KVTUNER_PAIR_OP(+)
KVTUNER_PAIR_OP(-)
KVTUNER_PAIR_OP(*)
KVTUNER_PAIR_OP(&)
KVTUNER_PAIR_OP(<<)
KVTUNER_PAIR_OP(>>)
#undef KVTUNER_PAIR_OP

inline vi16 to_int(v16 x) {
  return {__builtin_convertvector(x.lo, vi8), __builtin_convertvector(x.hi, vi8)};
}
inline v16 to_float(vi16 x) {
  return {__builtin_convertvector(x.lo, v8), __builtin_convertvector(x.hi, v8)};
}
inline v16 zero_below(v16 x, float limit, v16 y) {
  return {x.lo < limit ? v8{} : y.lo, x.hi < limit ? v8{} : y.hi};
}
inline v16 at_least(v16 x, float limit) {
  return {x.lo < limit ? v8{} + limit : x.lo, x.hi < limit ? v8{} + limit : x.hi};
}
inline v8 halves(v16 v) { return v.lo + v.hi; }

inline v16 load16(const float* p) {
  v8 lo, hi;
  std::memcpy(&lo, p, sizeof(lo));
  std::memcpy(&hi, p + 8, sizeof(hi));
  return {lo, hi};
}

inline void store16(float* p, v16 v) {
  std::memcpy(p, &v.lo, sizeof(v.lo));
  std::memcpy(p + 8, &v.hi, sizeof(v.hi));
}
#endif

inline float hsum(v16 v) {
  const v8 a = halves(v);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// {hsum(a), hsum(b), hsum(c), hsum(d)}, bit for bit (the same additions in the same order), with
// the four reductions sharing their shuffles.
inline v4 hsum4(v16 a, v16 b, v16 c, v16 d) {
  const v8 a8 = halves(a), b8 = halves(b), c8 = halves(c), d8 = halves(d);
  const v8 ab = __builtin_shufflevector(a8, b8, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(a8, b8, 4, 5, 6, 7, 12, 13, 14, 15);
  const v8 cd = __builtin_shufflevector(c8, d8, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(c8, d8, 4, 5, 6, 7, 12, 13, 14, 15);
  const v8 x = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
               __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(x, x, 0, 2, 4, 6) + __builtin_shufflevector(x, x, 1, 3, 5, 7);
}


// 16 values of any float type -> float32 lanes
template <typename T>
inline v16 load16_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load16(p);
  } else {
    alignas(64) float lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = static_cast<float>(p[l]);
    return load16(lanes);
  }
}

// exp(x) for x <= 0 (a score minus its row's maximum) on 16 lanes; x < -87 (and -inf) gives 0.
// Cephes' expf: 2^n * p(r) with |r| <= ln(2)/2, relative error about 2e-7; n rounded to nearest
// by the 1.5 * 2^23 trick (|x log2 e| < 2^22).
inline v16 exp16(v16 x) {
  const v16 xc = at_least(x, -87.0f);
  const v16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const v16 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 y = p * r * r + r + 1.0f;
  const vi16 bits = (to_int(n) + 127) << 23;
  v16 pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return zero_below(x, -87.0f, y * pow2);
}

// 16 bytes -> 16 int32 (zero-extended): one instruction where the CPU has it
inline vi16 widen(const uint8_t* p) {
  vi16 x;
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&x, &w, sizeof(x));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  x.lo = reinterpret_cast<vi8>(_mm256_cvtepu8_epi32(bytes));
  x.hi = reinterpret_cast<vi8>(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
#else
  int32_t lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = p[l];
  std::memcpy(&x, lanes, sizeof(x));
#endif
  return x;
}

// packed row of D codes (planes along head_dim, see kvtuner/quant/packing.py) -> D / 16 vectors
template <int D>
inline void unpack_row(const uint8_t* row, int bits, v16* code) {
  auto planes = [&](auto bits_c) {
    constexpr int B = decltype(bits_c)::value;
    constexpr int per = 8 / B, w = D / per, mask = (1 << B) - 1;
    for (int k = 0; k < w / 16; ++k) {
      const vi16 x = widen(row + 16 * k);
      for (int p = 0; p < per; ++p)
        code[(p * w) / 16 + k] = to_float((x >> (p * B)) & mask);
    }
  };
  if (bits == 4)
    planes(std::integral_constant<int, 4>());
  else if (bits == 2)
    planes(std::integral_constant<int, 2>());
  else
    planes(std::integral_constant<int, 8>());
}

// Rows of one part of one (batch row, KV head): either full-precision rows or packed codes.
template <typename T>
struct Rows {
  // dense
  const T* dense = nullptr;
  int64_t dense_stride = 0;  // elements between tokens
  // packed
  const uint8_t* packed = nullptr;
  int64_t packed_stride = 0;  // bytes between tokens
  const T* scale = nullptr;
  const T* zero = nullptr;
  int64_t scale_stride = 0;  // elements between scale rows (tokens, or blocks per channel)
  int bits = 0;
  int group = 0;  // channels per per-token group, or tokens per per-channel block
  bool per_channel = false;
  int64_t width = 0;  // bytes per packed row
  const float* channel_scale = nullptr;  // [d] multiplies every row, or null

  // packed row `token` of per-token groups of whole 16-channel vectors, head_dim D -> D / 16
  // vectors dequantized in registers (code * scale + zero of each vector's group)
  template <int D>
  void dequantize_row(int64_t token, const int* group_of, v16* code) const {
    unpack_row<D>(packed + token * packed_stride, bits, code);
    const T* s = scale + token * scale_stride;
    const T* z = zero + token * scale_stride;
    for (int u = 0; u < D / 16; ++u)
      code[u] = code[u] * static_cast<float>(s[group_of[u]]) + static_cast<float>(z[group_of[u]]);
  }

  // rows [t0, t0 + count) -> out[count][d] float32; D: head_dim when known at compile time (else 0)
  template <int D>
  void read(int64_t t0, int64_t count, int64_t d_runtime, float* out) const {
    const int64_t d = D ? D : d_runtime;
    if (dense != nullptr) {
      for (int64_t t = 0; t < count; ++t) {
        const T* row = dense + (t0 + t) * dense_stride;
        float* o = out + t * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(row[c]);
      }
      return;
    }
    switch (bits) {
      case 2: return read_packed<D, 2>(t0, count, d, out);
      case 4: return read_packed<D, 4>(t0, count, d, out);
      default: return read_packed<D, 8>(t0, count, d, out);
    }
  }

  template <int D, int BITS>
  void read_packed(int64_t t0, int64_t count, int64_t d_runtime, float* out) const {
    constexpr int per = 8 / BITS;
    constexpr int mask = (1 << BITS) - 1;
    const int64_t d = D ? D : d_runtime;
    const int64_t w = D && (D % per == 0) ? D / per : width;
    for (int64_t t = 0; t < count; ++t) {
      const int64_t token = t0 + t;
      const uint8_t* row = packed + token * packed_stride;
      float* o = out + t * d;
      if (w * per == d) {  // whole planes
        for (int p = 0; p < per; ++p) {
          float* op = o + p * w;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j)
            op[j] = static_cast<float>((row[j] >> (p * BITS)) & mask);
        }
      } else {
        for (int p = 0; p < per; ++p) {
          const int64_t lo = p * w;
          const int64_t hi = std::min<int64_t>(lo + w, d);
          for (int64_t j = 0; j < hi - lo; ++j)
            o[lo + j] = static_cast<float>((row[j] >> (p * BITS)) & mask);
        }
      }
      if (per_channel) {
        const T* s = scale + (token / group) * scale_stride;
        const T* z = zero + (token / group) * scale_stride;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c)
          o[c] = o[c] * static_cast<float>(s[c]) + static_cast<float>(z[c]);
      } else if (group == d) {
        const float sg = static_cast<float>(scale[token * scale_stride]);
        const float zg = static_cast<float>(zero[token * scale_stride]);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = o[c] * sg + zg;
      } else {
        const T* s = scale + token * scale_stride;
        const T* z = zero + token * scale_stride;
        for (int64_t g0 = 0, gi = 0; g0 < d; g0 += group, ++gi) {
          const float sg = static_cast<float>(s[gi]);
          const float zg = static_cast<float>(z[gi]);
          float* og = o + g0;
#pragma omp simd
          for (int64_t c = 0; c < group; ++c) og[c] = og[c] * sg + zg;
        }
      }
      if (channel_scale != nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] *= channel_scale[c];
      }
    }
  }
};

struct Item {
  int64_t bh;     // batch row * kv_heads + head
  int part;       // 0 sinks, 1 stored, 2 residual
  int64_t first;  // first token within the part
  int64_t count;
  int64_t offset;  // index of the first token among all the layer's held tokens (for the bias)
};

template <typename T>
struct Layer {
  int64_t b, h, g, d;
  const float* q;        // [b, h, g, d] (scaled)
  const float* q_keys;   // the same, times the key channel scale (stored keys), or q
  const float* bias;     // [rows, total] or null
  int64_t bias_rows, total;
  std::vector<Rows<T>> keys, values;  // [bh * 3 + part]

  // one item -> partial[g][d + 2]: value sum, then max and sum of exponentials, per query head
  template <int D>
  void run(const Item& item, float* kbuf, float* scores, float* partial) const {
    const int64_t d = D ? D : this->d;
    const Rows<T>& k = keys[item.bh * 3 + item.part];
    const Rows<T>& v = values[item.bh * 3 + item.part];
    const int64_t n = item.count;
    const float* qh = (item.part == 1 ? q_keys : q) + item.bh * g * d;
    k.template read<D>(item.first, n, d, kbuf);
    for (int64_t i = 0; i < g; ++i) {
      const float* qi = qh + i * d;
      float* si = scores + i * n;
      for (int64_t t = 0; t < n; ++t) {
        const float* kt = kbuf + t * d;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; ++c) acc += qi[c] * kt[c];
        si[t] = acc;
      }
    }
    softmax(item, scores, partial);
    v.template read<D>(item.first, n, d, kbuf);
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = kbuf + t * d;
      for (int64_t i = 0; i < g; ++i) {
        const float w = scores[i * n + t];
        float* out = partial + i * (d + 2);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) out[c] += w * vt[c];
      }
    }
  }

  // whether run_stored takes the stored part (else run does, dequantizing into a buffer)
  bool fast() const {
    if ((d != 64 && d != 128 && d != 256) || g > 8) return false;
    const Rows<T>& k = keys[1];
    const Rows<T>& v = values[1];
    return (k.per_channel || k.group % 16 == 0) && v.group % 16 == 0 && !v.per_channel;
  }

  void softmax(const Item& item, float* scores, float* partial) const;
  template <int D, int G>
  void run_stored(const Item& item, float* scores, float* partial) const;
  template <int D, int H>
  void run_values(const Item& item, const float* scores, float* partial, int h0) const;
  template <int D>
  void run_stored_g(const Item& item, float* scores, float* partial) const;
};

template <typename T>
void Layer<T>::softmax(const Item& item, float* scores, float* partial) const {
  const int64_t n = item.count;
  const float* brow = nullptr;
  if (bias != nullptr) {
    const int64_t batch = item.bh / h;
    brow = bias + (bias_rows > 1 ? batch : 0) * total + item.offset + item.first;
  }
  for (int64_t i = 0; i < g; ++i) {
    float* si = scores + i * n;
    if (brow != nullptr) {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) si[t] += brow[t];
    }
    float m = NEG_INF;
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < n; ++t) m = si[t] > m ? si[t] : m;
    float sum = 0.0f;
    if (m != NEG_INF) {
      int64_t t = 0;
      v16 sums = v16{};
      for (; t + 16 <= n; t += 16) {
        const v16 e = exp16(load16(si + t) - m);
        store16(si + t, e);
        sums += e;
      }
      if (t < n) {  // the last partial vector, padded with -inf (exp 0)
        alignas(64) float tail[16];
        std::fill(tail, tail + 16, NEG_INF);
        std::copy(si + t, si + n, tail);
        const v16 e = exp16(load16(tail) - m);
        store16(tail, e);
        std::copy(tail, tail + (n - t), si + t);
        sums += e;
      }
      sum = hsum(sums);
    } else {
      std::fill(si, si + n, 0.0f);
    }
    float* out = partial + i * (d + 2);
    std::fill(out, out + d, 0.0f);
    out[d] = m;
    out[d + 1] = sum;
  }
}

// The stored part with head_dim D (a multiple of 16) and G query heads per KV head known at
// compile time, groups of whole 16-channel vectors: codes are unpacked and dequantized in
// registers, never into memory, one row at a time for all the query heads that read it. Keys:
// q . (s c + z) (per-token groups), or (q * s_block) . c + q . z_block (KIVI blocks: the block's
// scales folded into the query once per block); values: sum_t p_t (s_t c_t + z_t).
template <typename T>
template <int D, int G>
void Layer<T>::run_stored(const Item& item, float* scores, float* partial) const {
  constexpr int V = D / 16;
  const Rows<T>& k = keys[item.bh * 3 + 1];
  const int64_t n = item.count;
  const float* qh = q_keys + item.bh * G * D;
  v16 code[V];
  if (k.per_channel) {
    alignas(64) float qs[G * D];
    float shift[G];
    int64_t block = -1;
    for (int64_t t = 0; t < n;) {
      const int64_t token = item.first + t;
      if (token / k.group != block) {  // fold the block's channel scales into the query
        block = token / k.group;
        v16 sb[V], zb[V];
        for (int u = 0; u < V; ++u) {
          sb[u] = load16_float(k.scale + block * k.scale_stride + 16 * u);
          zb[u] = load16_float(k.zero + block * k.scale_stride + 16 * u);
        }
        for (int i = 0; i < G; ++i) {
          v16 acc = v16{};
          for (int u = 0; u < V; ++u) {
            const v16 qu = load16(qh + i * D + 16 * u);
            store16(qs + i * D + 16 * u, qu * sb[u]);
            acc += qu * zb[u];
          }
          shift[i] = hsum(acc);
        }
      }
      if (t + 4 <= n && (token + 3) / k.group == block) {  // four tokens of one block (hsum4)
        v16 acc[G][4];
        for (int j = 0; j < 4; ++j) {
          unpack_row<D>(k.packed + (token + j) * k.packed_stride, k.bits, code);
          for (int i = 0; i < G; ++i) {
            v16 a = load16(qs + i * D) * code[0];
            for (int u = 1; u < V; ++u) a += load16(qs + i * D + 16 * u) * code[u];
            acc[i][j] = a;
          }
        }
        for (int i = 0; i < G; ++i) {
          const v4 sums = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]) + shift[i];
          std::memcpy(scores + i * n + t, &sums, sizeof(sums));
        }
        t += 4;
        continue;
      }
      unpack_row<D>(k.packed + token * k.packed_stride, k.bits, code);
      for (int i = 0; i < G; ++i) {
        v16 acc = load16(qs + i * D) * code[0];
        for (int u = 1; u < V; ++u) acc += load16(qs + i * D + 16 * u) * code[u];
        scores[i * n + t] = hsum(acc) + shift[i];
      }
      ++t;
    }
  } else {
    int kgroup_of[V];
    for (int u = 0; u < V; ++u) kgroup_of[u] = u / (k.group / 16);
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {  // four tokens, then one shared reduction per head (hsum4)
      v16 acc[G][4];
      for (int j = 0; j < 4; ++j) {
        k.template dequantize_row<D>(item.first + t + j, kgroup_of, code);  // once for the G heads
        for (int i = 0; i < G; ++i) {
          v16 a = load16(qh + i * D) * code[0];
          for (int u = 1; u < V; ++u) a += load16(qh + i * D + 16 * u) * code[u];
          acc[i][j] = a;
        }
      }
      for (int i = 0; i < G; ++i) {
        const v4 sums = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        std::memcpy(scores + i * n + t, &sums, sizeof(sums));
      }
    }
    for (; t < n; ++t) {
      k.template dequantize_row<D>(item.first + t, kgroup_of, code);
      for (int i = 0; i < G; ++i) {
        v16 acc = load16(qh + i * D) * code[0];
        for (int u = 1; u < V; ++u) acc += load16(qh + i * D + 16 * u) * code[u];
        scores[i * n + t] = hsum(acc);
      }
    }
  }
  softmax(item, scores, partial);
  // values in passes of up to P query heads, so that the P * V accumulators stay in registers (all
  // G heads at once kept them in memory: a load and a store per head, vector and token). At head
  // size 256 no pass fits (16 vectors a head); passes of 4 there still beat one pass a head, which
  // unpacks every row again for each head (Gemma 3's layer at 16384 tokens: 1.15 against 1.23 ms)
  constexpr int P = D == 128 ? 2 : 4;
  for (int h0 = 0; h0 < G; h0 += P) {
    switch (std::min(P, G - h0)) {
      case 1: run_values<D, 1>(item, scores, partial, h0); break;
      case 2: run_values<D, 2>(item, scores, partial, h0); break;
      case 3: run_values<D, 3>(item, scores, partial, h0); break;
      default: run_values<D, 4>(item, scores, partial, h0);
    }
  }
}

// The stored values of query heads [h0, h0 + H) of one item: sum_t p_t (s_t c_t + z_t), each row
// dequantized once in registers for the H heads.
template <typename T>
template <int D, int H>
void Layer<T>::run_values(const Item& item, const float* scores, float* partial, int h0) const {
  constexpr int V = D / 16;
  const Rows<T>& v = values[item.bh * 3 + 1];
  const int64_t n = item.count;
  int group_of[V];
  for (int u = 0; u < V; ++u) group_of[u] = u / (v.group / 16);
  v16 acc[H][V];
  for (int i = 0; i < H; ++i)
    for (int u = 0; u < V; ++u) acc[i][u] = v16{};
  v16 code[V];
  for (int64_t t = 0; t < n; ++t) {
    v.template dequantize_row<D>(item.first + t, group_of, code);
    for (int i = 0; i < H; ++i) {
      const float p = scores[(h0 + i) * n + t];
      for (int u = 0; u < V; ++u) acc[i][u] += p * code[u];
    }
  }
  for (int i = 0; i < H; ++i) {
    float* out = partial + (h0 + i) * (D + 2);
    for (int u = 0; u < V; ++u) {
      v16 o = acc[i][u];
      if (v.channel_scale != nullptr) o *= load16(v.channel_scale + 16 * u);
      store16(out + 16 * u, o);
    }
  }
}

template <typename T>
template <int D>
void Layer<T>::run_stored_g(const Item& item, float* scores, float* partial) const {
  switch (g) {
    case 1: return run_stored<D, 1>(item, scores, partial);
    case 2: return run_stored<D, 2>(item, scores, partial);
    case 3: return run_stored<D, 3>(item, scores, partial);
    case 4: return run_stored<D, 4>(item, scores, partial);
    case 5: return run_stored<D, 5>(item, scores, partial);
    case 6: return run_stored<D, 6>(item, scores, partial);
    case 7: return run_stored<D, 7>(item, scores, partial);
    default: return run_stored<D, 8>(item, scores, partial);
  }
}

template <typename T>
Rows<T> dense_rows(const at::Tensor& x, int64_t batch, int64_t head) {
  // x [b, h, n, d]
  Rows<T> rows;
  rows.dense = x.data_ptr<T>() + batch * x.stride(0) + head * x.stride(1);
  rows.dense_stride = x.stride(2);
  return rows;
}

template <typename T>
Rows<T> packed_rows(
    const at::Tensor& packed,
    const at::Tensor& scale,
    const at::Tensor& zero,
    int64_t bits,
    int64_t group,
    bool per_channel,
    const float* channel_scale,
    int64_t batch,
    int64_t head) {
  Rows<T> rows;
  rows.packed = packed.data_ptr<uint8_t>() + batch * packed.stride(0) + head * packed.stride(1);
  rows.packed_stride = packed.stride(2);
  rows.width = packed.size(3);
  rows.scale = scale.data_ptr<T>() + batch * scale.stride(0) + head * scale.stride(1);
  rows.zero = zero.data_ptr<T>() + batch * zero.stride(0) + head * zero.stride(1);
  TORCH_CHECK(scale.stride(2) == zero.stride(2), "kvtuner: scale and zero strides differ");
  rows.scale_stride = scale.stride(2);
  rows.bits = static_cast<int>(bits);
  rows.group = static_cast<int>(group);
  rows.per_channel = per_channel;
  rows.channel_scale = channel_scale;
  return rows;
}

// channel scale [b, h, 1, d] (any float dtype) -> float32 [b * h * d], or empty
std::vector<float> channel_scales(const std::optional<at::Tensor>& cs, int64_t b, int64_t h, int64_t d) {
  std::vector<float> out;
  if (!cs.has_value()) return out;
  at::Tensor f = cs->to(at::kFloat).expand({b, h, 1, d}).contiguous();
  out.assign(f.data_ptr<float>(), f.data_ptr<float>() + b * h * d);
  return out;
}

template <typename T>
void decode(
    const at::Tensor& q,
    const at::Tensor& sink,
    const at::Tensor& res,
    const at::Tensor& kpacked,
    const at::Tensor& kscale,
    const at::Tensor& kzero,
    const std::vector<float>& kcs,
    const at::Tensor& vpacked,
    const at::Tensor& vscale,
    const at::Tensor& vzero,
    const std::vector<float>& vcs,
    const std::optional<at::Tensor>& bias,
    int64_t kbits,
    int64_t kgroup,
    int64_t vbits,
    int64_t vgroup,
    bool per_channel_keys,
    at::Tensor& out) {
  const int64_t b = q.size(0), h = q.size(1), g = q.size(2), d = q.size(3);
  const int64_t ns = sink.size(3), n = kpacked.size(2), nr = res.size(3);
  Layer<T> layer;
  layer.b = b;
  layer.h = h;
  layer.g = g;
  layer.d = d;
  layer.q = q.data_ptr<float>();
  layer.total = ns + n + nr;
  at::Tensor q_keys = q;
  if (!kcs.empty()) {
    q_keys = at::empty(q.sizes(), q.options());
    float* dst = q_keys.data_ptr<float>();
    for (int64_t bh = 0; bh < b * h; ++bh)
      for (int64_t i = 0; i < g; ++i)
        for (int64_t c = 0; c < d; ++c)
          dst[(bh * g + i) * d + c] = layer.q[(bh * g + i) * d + c] * kcs[bh * d + c];
  }
  layer.q_keys = q_keys.data_ptr<float>();
  at::Tensor bias_f;
  if (bias.has_value()) {
    bias_f = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.size(-1) == layer.total, "kvtuner: the bias covers ", bias_f.size(-1),
                " tokens, the layer holds ", layer.total);
    layer.bias = bias_f.data_ptr<float>();
    layer.bias_rows = bias_f.size(0);
  } else {
    layer.bias = nullptr;
    layer.bias_rows = 0;
  }
  at::Tensor sk = sink.select(0, 0), sv = sink.select(0, 1);
  at::Tensor rk = res.select(0, 0), rv = res.select(0, 1);
  std::vector<Item> items;
  std::vector<int64_t> first_item(b * h + 1, 0);
  for (int64_t batch = 0; batch < b; ++batch) {
    for (int64_t head = 0; head < h; ++head) {
      const int64_t bh = batch * h + head;
      const float* vc = vcs.empty() ? nullptr : vcs.data() + bh * d;  // (keys': in q_keys)
      layer.keys.push_back(ns ? dense_rows<T>(sk, batch, head) : Rows<T>());
      layer.values.push_back(ns ? dense_rows<T>(sv, batch, head) : Rows<T>());
      layer.keys.push_back(
          n ? packed_rows<T>(kpacked, kscale, kzero, kbits, kgroup, per_channel_keys, nullptr,
                             batch, head)
            : Rows<T>());
      layer.values.push_back(
          n ? packed_rows<T>(vpacked, vscale, vzero, vbits, vgroup, false, vc, batch, head)
            : Rows<T>());
      layer.keys.push_back(nr ? dense_rows<T>(rk, batch, head) : Rows<T>());
      layer.values.push_back(nr ? dense_rows<T>(rv, batch, head) : Rows<T>());
      first_item[bh] = static_cast<int64_t>(items.size());
      const int64_t counts[3] = {ns, n, nr};
      int64_t offset = 0;
      for (int part = 0; part < 3; ++part) {
        for (int64_t t = 0; t < counts[part]; t += CHUNK)
          items.push_back({bh, part, t, std::min(CHUNK, counts[part] - t), offset});
        offset += counts[part];
      }
    }
  }
  first_item[b * h] = static_cast<int64_t>(items.size());
  const int64_t stride = g * (d + 2);
  std::vector<float> partials(items.size() * stride);
  const bool fast = n > 0 && layer.fast() && std::getenv("KVTUNER_NATIVE_GENERIC") == nullptr;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> kbuf(CHUNK * d), scores(g * CHUNK);
    for (int64_t index = lo; index < hi; ++index) {
      float* partial = partials.data() + index * stride;
      if (fast && items[index].part == 1) {
        switch (d) {
          case 64: layer.template run_stored_g<64>(items[index], scores.data(), partial); break;
          case 128: layer.template run_stored_g<128>(items[index], scores.data(), partial); break;
          default: layer.template run_stored_g<256>(items[index], scores.data(), partial);
        }
        continue;
      }
      switch (d) {  // loops over head_dim unrolled for the usual sizes
        case 64: layer.template run<64>(items[index], kbuf.data(), scores.data(), partial); break;
        case 128: layer.template run<128>(items[index], kbuf.data(), scores.data(), partial); break;
        case 256: layer.template run<256>(items[index], kbuf.data(), scores.data(), partial); break;
        default: layer.template run<0>(items[index], kbuf.data(), scores.data(), partial);
      }
    }
  });
  float* o = out.data_ptr<float>();
  for (int64_t bh = 0; bh < b * h; ++bh) {
    for (int64_t i = 0; i < g; ++i) {
      float m = NEG_INF;
      for (int64_t it = first_item[bh]; it < first_item[bh + 1]; ++it)
        m = std::max(m, partials[it * stride + i * (d + 2) + d]);
      float* dst = o + (bh * g + i) * d;
      std::fill(dst, dst + d, 0.0f);
      float sum = 0.0f;
      for (int64_t it = first_item[bh]; it < first_item[bh + 1]; ++it) {
        const float* part = partials.data() + it * stride + i * (d + 2);
        if (part[d] == NEG_INF) continue;
        const float w = std::exp(part[d] - m);
        sum += w * part[d + 1];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) dst[c] += w * part[c];
      }
      const float inv = 1.0f / sum;  // every token masked: 0 / 0 = NaN, as softmax gives
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) dst[c] *= inv;
    }
  }
}

at::Tensor decode_layer(
    const at::Tensor& q,
    const at::Tensor& sink,
    const at::Tensor& res,
    const at::Tensor& kpacked,
    const at::Tensor& kscale,
    const at::Tensor& kzero,
    const std::optional<at::Tensor>& kcs,
    const at::Tensor& vpacked,
    const at::Tensor& vscale,
    const at::Tensor& vzero,
    const std::optional<at::Tensor>& vcs,
    const std::optional<at::Tensor>& bias,
    int64_t kbits,
    int64_t kgroup,
    int64_t vbits,
    int64_t vgroup,
    bool per_channel_keys) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "kvtuner: queries must be contiguous float32 [b, h, g, d]");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(3);
  for (const at::Tensor* t : {&kpacked, &vpacked})
    TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 4 && t->stride(3) == 1,
                "kvtuner: packed codes must be uint8 [b, h, n, m] with contiguous rows");
  for (const at::Tensor* t : {&sink, &res})
    TORCH_CHECK(t->dim() == 5 && t->stride(4) == 1 && t->scalar_type() == kscale.scalar_type(),
                "kvtuner: sinks and residual must be [2, b, h, n, d] in the scales' dtype");
  for (const at::Tensor* t : {&kscale, &kzero, &vscale, &vzero})
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1 && t->scalar_type() == kscale.scalar_type(),
                "kvtuner: scales and zeros must share one dtype, with contiguous rows");
  TORCH_CHECK(kbits == 2 || kbits == 4 || kbits == 8, "kvtuner: key bits must be 2, 4 or 8");
  TORCH_CHECK(vbits == 2 || vbits == 4 || vbits == 8, "kvtuner: value bits must be 2, 4 or 8");
  TORCH_CHECK(per_channel_keys || d % kgroup == 0, "kvtuner: key groups must divide head_dim");
  TORCH_CHECK(d % vgroup == 0, "kvtuner: value groups must divide head_dim");
  TORCH_CHECK(!per_channel_keys || kpacked.size(2) % kgroup == 0,
              "kvtuner: per-channel keys must hold whole blocks");
  std::vector<float> kc = channel_scales(kcs, b, h, d);
  std::vector<float> vc = channel_scales(vcs, b, h, d);
  at::Tensor out = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kscale.scalar_type(), "kvtuner_decode", [&] {
    decode<scalar_t>(q, sink, res, kpacked, kscale, kzero, kc, vpacked, vscale, vzero, vc, bias,
                     kbits, kgroup, vbits, vgroup, per_channel_keys, out);
  });
  return out;
}

// -- a decode step's new tokens, quantized per token into the stores' next rows ---------------------
// Offset (in elements) of row `r` of `t` [..., n, width], rows counted over every dim but the last.
int64_t row_offset(const at::Tensor& t, int64_t r) {
  int64_t offset = 0;
  for (int64_t dim = t.dim() - 2; dim >= 0; --dim) {
    offset += (r % t.size(dim)) * t.stride(dim);
    r /= t.size(dim);
  }
  return offset;
}

// What kvtuner.quant.quantizer.quantize_per_token computes, bit for bit: per group of `group`
// channels, scale = (max - min) / (2^bits - 1) and zero = min, both rounded to T; codes =
// round_half_even((x - zero) / max(scale, FLT_MIN)), NaN -> 0, clamped; packed in planes.
template <typename T>
void quantize_rows_impl(const at::Tensor& x, const at::Tensor& cs, at::Tensor& packed,
                        at::Tensor& scale, at::Tensor& zero, int64_t bits, int64_t group) {
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  const int per = 8 / static_cast<int>(bits);
  const int64_t width = packed.size(-1);
  const float qmax = static_cast<float>((1 << bits) - 1);
  const T* xs = x.data_ptr<T>();
  const T* c = cs.defined() ? cs.data_ptr<T>() : nullptr;
  uint8_t* pk = packed.data_ptr<uint8_t>();
  T* sc = scale.data_ptr<T>();
  T* zr = zero.data_ptr<T>();
  std::vector<float> v(d), codes(width * per, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = xs + r * d;
    const T* cr = c == nullptr ? nullptr : c + r * d;  // expanded to x's shape
    for (int64_t j = 0; j < d; ++j)
      v[j] = cr == nullptr ? static_cast<float>(xr[j])
                           : static_cast<float>(static_cast<T>(static_cast<float>(xr[j]) /
                                                               static_cast<float>(cr[j])));
    T* srow = sc + row_offset(scale, r);
    T* zrow = zr + row_offset(zero, r);
    for (int64_t g0 = 0, gi = 0; g0 < d; g0 += group, ++gi) {
      float lo = v[g0], hi = v[g0];
      bool nan = false;
      for (int64_t j = g0; j < g0 + group; ++j) {
        nan |= std::isnan(v[j]);
        lo = std::min(lo, v[j]);
        hi = std::max(hi, v[j]);
      }
      if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
      const T s = static_cast<T>((hi - lo) / qmax);
      const T z = static_cast<T>(lo);
      srow[gi] = s;
      zrow[gi] = z;
      const float safe = std::max(static_cast<float>(s), std::numeric_limits<float>::min());
      const float zf = static_cast<float>(z);
      for (int64_t j = g0; j < g0 + group; ++j) {
        float q = std::nearbyint((v[j] - zf) / safe);
        if (std::isnan(q)) q = 0.0f;
        codes[j] = std::min(std::max(q, 0.0f), qmax);
      }
    }
    uint8_t* prow = pk + row_offset(packed, r);
    for (int64_t j = 0; j < width; ++j) {
      int byte = 0;
      for (int p = 0; p < per; ++p) {
        const int64_t ch = p * width + j;
        if (ch < d) byte |= static_cast<int>(codes[ch]) << (p * bits);
      }
      prow[j] = static_cast<uint8_t>(byte);
    }
  }
}

void quantize_rows(const at::Tensor& x, const std::optional<at::Tensor>& channel_scale,
                   at::Tensor& packed, at::Tensor& scale, at::Tensor& zero, int64_t bits,
                   int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "kvtuner: bits must be 2, 4 or 8");
  const int64_t d = x.size(-1);
  TORCH_CHECK(group > 0 && d % group == 0, "kvtuner: group must divide head_dim");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.stride(-1) == 1 &&
                  packed.size(-1) == (d * bits + 7) / 8,
              "kvtuner: packed rows must be uint8 [..., ceil(head_dim * bits / 8)]");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() && zero.scalar_type() == x.scalar_type() &&
                  scale.size(-1) == d / group && zero.size(-1) == d / group &&
                  scale.stride(-1) == 1 && zero.stride(-1) == 1,
              "kvtuner: scale and zero rows must be [..., head_dim / group] in x's dtype");
  TORCH_CHECK(packed.numel() / packed.size(-1) == x.numel() / d &&
                  scale.numel() / scale.size(-1) == x.numel() / d &&
                  zero.numel() / zero.size(-1) == x.numel() / d,
              "kvtuner: outputs must hold one row per row of x");
  at::Tensor xc = x.contiguous();
  at::Tensor cs;
  if (channel_scale.has_value()) {
    TORCH_CHECK(channel_scale->scalar_type() == x.scalar_type(),
                "kvtuner: the channel scale must be in x's dtype");
    // [..., 1, d] broadcast over the tokens of each leading index: one row per token
    std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
    cs = channel_scale->expand(sizes).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kvtuner_quantize", [&] {
    quantize_rows_impl<scalar_t>(xc, cs, packed, scale, zero, bits, group);
  });
}

}  // namespace

TORCH_LIBRARY(kvtuner, m) {
  m.def(
      "decode_layer(Tensor q, Tensor sink, Tensor res, Tensor kpacked, Tensor kscale, "
      "Tensor kzero, Tensor? kcs, Tensor vpacked, Tensor vscale, Tensor vzero, Tensor? vcs, "
      "Tensor? bias, int kbits, int kgroup, int vbits, int vgroup, bool per_channel_keys) -> Tensor");
  m.def(
      "quantize_rows(Tensor x, Tensor? channel_scale, Tensor(a!) packed, Tensor(b!) scale, "
      "Tensor(c!) zero, int bits, int group) -> ()");
}

TORCH_LIBRARY_IMPL(kvtuner, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("quantize_rows", &quantize_rows);
}
