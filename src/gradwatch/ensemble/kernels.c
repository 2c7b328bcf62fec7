/* Small batched matmuls for stacked MLPs: thousands of 10 x 11 by 11 x 32 products a step; the
   activations and derivatives that go with them; and a whole step, member after member.

   MKL's batched GEMM pays a per-matrix setup that is about half of such a product's time; these loops
   keep each member's few rows in registers instead, with GCC/Clang vector types (16 floats: one
   AVX-512 register, two AVX2 ones, four NEON ones; the compiler picks). Float32, the last dimension
   of every operand contiguous, any member and row strides. Each activation and derivative computes
   what aten's does, to the bit, so that a stacked member differs from its single run only by the
   order of a product's sums (1e-5, tests/test_ensemble.py). See kernels.py. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef int64_t i64;
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
enum { ROWS = 16 }; /* output rows kept in registers at once */

/* r rows of y (a constant where inlined, so that the r sums stay in registers without a test per row),
   WIDTH columns: y[j, :] = sum_c w[j ws_r + c ws_c] x[c, :] */
#define TILE(V, WIDTH)                                                                                 \
  static inline __attribute__((always_inline)) void tile##WIDTH(const float *w, i64 ws_r, i64 ws_c,  \
                                 const float *x, i64 xs_r, float *y, i64 ys_r, const int r, i64 C) { \
    V acc[ROWS] = {0};                                                                               \
    for (i64 c = 0; c < C; c++) {                                                                    \
      V xv = *(const V *)(x + c * xs_r);                                                             \
      for (int j = 0; j < r; j++) acc[j] += w[j * ws_r + c * ws_c] * xv;                             \
    }                                                                                                \
    for (int j = 0; j < r; j++) *(V *)(y + j * ys_r) = acc[j];                                       \
  }
TILE(v16, 16)
TILE(v8, 8)

/* R rows, all of B: the tiles above for a constant R, one function per R (0.82x a step's time
   against 8-row tiles with a test per row); the last B % 8 examples one fused multiply-add at a
   time, as the vectors' sums are contracted, so that every build and inlining gives one number */
#define ROWS_OF(R)                                                                                     \
  static void rows##R(const float *w, i64 ws_r, i64 ws_c, const float *x, i64 xs_r, float *y, i64 ys_r, \
                      i64 C, i64 B) {                                                                  \
    i64 b = 0;                                                                                         \
    for (; b + 16 <= B; b += 16) tile16(w, ws_r, ws_c, x + b, xs_r, y + b, ys_r, R, C);                \
    for (; b + 8 <= B; b += 8) tile8(w, ws_r, ws_c, x + b, xs_r, y + b, ys_r, R, C);                   \
    for (; b < B; b++)                                                                                 \
      for (i64 j = 0; j < R; j++) {                                                                    \
        float s = 0.f;                                                                                 \
        for (i64 c = 0; c < C; c++) s = __builtin_fmaf(w[j * ws_r + c * ws_c], x[c * xs_r + b], s);     \
        y[j * ys_r + b] = s;                                                                           \
      }                                                                                                \
  }
ROWS_OF(1) ROWS_OF(2) ROWS_OF(3) ROWS_OF(4) ROWS_OF(5) ROWS_OF(6) ROWS_OF(7) ROWS_OF(8)
ROWS_OF(9) ROWS_OF(10) ROWS_OF(11) ROWS_OF(12) ROWS_OF(13) ROWS_OF(14) ROWS_OF(15) ROWS_OF(16)
typedef void rows_fn(const float *, i64, i64, const float *, i64, float *, i64, i64, i64);
static rows_fn *const BY_ROWS[ROWS + 1] = {0,      rows1,  rows2,  rows3,  rows4,  rows5,  rows6,  rows7,  rows8,
                                           rows9,  rows10, rows11, rows12, rows13, rows14, rows15, rows16};

/* one member: y (R, B) = w (R, C) x (C, B), w read through strides (a transposed view is free) */
static void product(const float *w, i64 ws_r, i64 ws_c, const float *x, i64 xs_r, float *y, i64 ys_r, i64 R,
                    i64 C, i64 B) {
  for (i64 i = 0; i < R; i += ROWS) {
    i64 r = R - i < ROWS ? R - i : ROWS;
    BY_ROWS[r](w + i * ws_r, ws_r, ws_c, x, xs_r, y + i * ys_r, ys_r, C, B);
  }
}

/* r[i][j] <- r[j][i]: four rounds of interleaving r[i] with r[i + 8], each rotating the 8 bits of
   (row, lane) left by one */
static inline void transpose16(v16 *r) {
  for (int round = 0; round < 4; round++) {
    v16 t[16];
    for (int i = 0; i < 8; i++) {
      t[2 * i] = __builtin_shufflevector(r[i], r[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      t[2 * i + 1] =
          __builtin_shufflevector(r[i], r[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
  }
}

/* the first n lanes of a row (the rest zero) */
static inline v16 take(const float *row, i64 n) {
  if (n == 16) return *(const v16 *)row;
  v16 v = {0};
  for (i64 l = 0; l < n; l++) v[l] = row[l];
  return v;
}

/* the first n lanes of v at out: one masked store where the CPU has them */
static inline void put(float *out, v16 v, i64 n) {
  if (n == 16) {
    *(v16 *)out = v;
    return;
  }
#ifdef __AVX512F__
  _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), (__m512)v);
#else
  for (i64 l = 0; l < n; l++) out[l] = v[l];
#endif
}

/* one member: d (O, K) = g (O, B) h (K, B)^T, a sum along the rows both operands keep contiguous.
   Each 16 x 16 block of h is transposed once, in registers (rows past K zero), then every output
   row adds one broadcast multiply-add per example of the block to its sum in acc (O vectors),
   instead of a horizontal sum per output */
static void outer_product(const float *g, i64 gs_r, const float *h, i64 hs_r, float *d, i64 ds_r, i64 O, i64 K,
                          i64 B, v16 *acc) {
  for (i64 k = 0; k < K; k += 16) {
    i64 rows = K - k < 16 ? K - k : 16;
    for (i64 o = 0; o < O; o++) acc[o] = (v16){0};
    for (i64 b = 0; b < B; b += 16) {
      i64 n = B - b < 16 ? B - b : 16;
      v16 r[16];
      for (int j = 0; j < 16; j++) r[j] = j < rows ? take(h + (k + j) * hs_r + b, n) : (v16){0};
      transpose16(r); /* r[l] = h[k .. k + 15, b + l] */
      for (i64 o = 0; o < O; o++) {
        const float *go = g + o * gs_r + b;
        v16 sum = acc[o];
        for (i64 l = 0; l < n; l++) sum += go[l] * r[l];
        acc[o] = sum;
      }
    }
    for (i64 o = 0; o < O; o++) put(d + o * ds_r + k, acc[o], rows);
  }
}

enum { SIGMOID = 1, TANH = 2, RELU = 3 }; /* kernels.ACTIVATIONS and kernels.DERIVATIVES */

/* 1 / (exp(-z) + 1) with exp as SLEEF's expf_u10 computes it (its reduction by ln 2 in two parts,
   its polynomial, its fused multiply-adds and its limits), the function torch's vectorized float
   exp calls: torch.sigmoid's numbers to the bit (tests/test_kernels.py). Scalar code, which the
   compiler turns into vector code; written on vector types it ran 5x slower */
static inline float sigmoid(float z) {
  float d = -z, s, u;
  int32_t q = (int32_t)__builtin_rintf(d * 1.442695040888963407359924681001892137426645954152985934135449406931f);
  int32_t half = q >> 1, lo = (half + 0x7f) << 23, hi = (q - half + 0x7f) << 23;
  float scale_lo, scale_hi;
  memcpy(&scale_lo, &lo, 4);
  memcpy(&scale_hi, &hi, 4);
  s = __builtin_fmaf((float)q, -0.693145751953125f, d);
  s = __builtin_fmaf((float)q, -1.428606765330187045e-06f, s);
  u = 0.000198527617612853646278381f;
  u = __builtin_fmaf(u, s, 0.00139304355252534151077271f);
  u = __builtin_fmaf(u, s, 0.00833336077630519866943359f);
  u = __builtin_fmaf(u, s, 0.0416664853692054748535156f);
  u = __builtin_fmaf(u, s, 0.166666671633720397949219f);
  u = __builtin_fmaf(u, s, 0.5f);
  u = 1.0f + __builtin_fmaf(s * s, u, s);
  u = u * scale_lo * scale_hi;
  u = d < -104.f ? 0.f : u;
  u = 100.f < d ? __builtin_inff() : u;
  return 1.0f / (u + 1.0f);
}

/* a (R, B) = f(z), as aten's vectorized sigmoid and relu (clamp_min(z, 0): a max with z second, so
   NaN and -0 pass) compute it */
static void activate(const float *z, i64 zs_r, float *a, i64 as_r, i64 R, i64 B, int8_t kind) {
  for (i64 r = 0; r < R; r++) {
    const float *zr = z + r * zs_r;
    float *ar = a + r * as_r;
    if (kind == SIGMOID)
      for (i64 b = 0; b < B; b++) ar[b] = sigmoid(zr[b]);
    else if (kind == RELU)
      for (i64 b = 0; b < B; b++) ar[b] = 0.f > zr[b] ? 0.f : zr[b];
  }
}

/* d (R, B) *= f'(z), from the activation a = f(z) (R, B), as aten's sigmoid_backward, tanh_backward
   and threshold_backward compute it: the same operations in the same order (tanh's 1 - a^2 one fused
   multiply-add, as aten's AVX-512 kernel rounds it), so the same numbers */
static void derive(float *d, i64 ds_r, const float *a, i64 as_r, i64 R, i64 B, int8_t kind) {
  for (i64 r = 0; r < R; r++) {
    float *dr = d + r * ds_r;
    const float *ar = a + r * as_r;
    if (kind == SIGMOID)
      for (i64 b = 0; b < B; b++) dr[b] = dr[b] * (1.f - ar[b]) * ar[b];
    else if (kind == TANH)
      for (i64 b = 0; b < B; b++) dr[b] = dr[b] * __builtin_fmaf(-ar[b], ar[b], 1.f);
    else if (kind == RELU)
      for (i64 b = 0; b < B; b++) dr[b] = ar[b] <= 0.f ? 0.f : dr[b];
  }
}

/* y[e] = w[e] x[e] for every member: w (E, R, C) through strides (ws_e, ws_r, ws_c); x (E, C, B), y (E, R, B);
   and a[e] = f(y[e]) (E, R, B) where kinds[e] names an activation f (kinds NULL: none) */
void matmul(const float *w, i64 ws_e, i64 ws_r, i64 ws_c, const float *x, i64 xs_e, i64 xs_r, float *y, i64 ys_e,
            i64 ys_r, float *a, i64 as_e, i64 as_r, const int8_t *kinds, i64 E, i64 R, i64 C, i64 B) {
  for (i64 e = 0; e < E; e++) {
    product(w + e * ws_e, ws_r, ws_c, x + e * xs_e, xs_r, y + e * ys_e, ys_r, R, C, B);
    if (kinds && kinds[e]) activate(y + e * ys_e, ys_r, a + e * as_e, as_r, R, B, kinds[e]);
  }
}

/* A Dense layer's backward for every member, g (E, O, B) read once while it is in cache:
   d[e] = g[e] h[e]^T (d (E, O, K), h (E, K, B): the weight gradient) and, unless dh is NULL,
   dh[e] = w[e]^T g[e] (w (E, O, C) with rows ws_r apart, dh (E, C, B): the input's gradient), times
   f'(z) where kinds[e] names the activation f whose output a[e] (E, C, B) was that input (kinds NULL:
   none). Returns 1 where its buffer of sums cannot be allocated, else 0 */
int backward(const float *g, i64 gs_e, i64 gs_r, const float *h, i64 hs_e, i64 hs_r, float *d, i64 ds_e, i64 ds_r,
             const float *w, i64 ws_e, i64 ws_r, float *dh, i64 dhs_e, i64 dhs_r, const float *a, i64 as_e,
             i64 as_r, const int8_t *kinds, i64 E, i64 O, i64 K, i64 C, i64 B) {
  v16 *acc = malloc(O * sizeof(v16));
  if (!acc) return 1;
  for (i64 e = 0; e < E; e++) {
    const float *ge = g + e * gs_e;
    outer_product(ge, gs_r, h + e * hs_e, hs_r, d + e * ds_e, ds_r, O, K, B, acc);
    if (dh) product(w + e * ws_e, 1, ws_r, ge, gs_r, dh + e * dhs_e, dhs_r, C, O, B);
    if (dh && kinds && kinds[e]) derive(dh + e * dhs_e, dhs_r, a + e * as_e, as_r, C, B, kinds[e]);
  }
  free(acc);
  return 0;
}

/* A whole training step of every member of a plain MLP (Dense layers 0..L, layer l with units[l]
   outputs and k[l] inputs plus the bias column; one activation per member, kinds[e], that both
   tables above have) under a sigmoid output with binary cross-entropy, member after member, so
   that each member's activations and gradients stay in cache instead of streaming every layer's
   buffers for all members through memory twice. For member e: the forward from x[e] (k[0], B),
   the output's pre-activations into out[e] (1, B), dL/dz = (sigmoid(z) - y[e]) scale[e] (as
   autograd computes BCE-with-logits' gradient under a mean scaled by scale[e]), and every layer's
   [dW | db] into d[l][e]; w[l] and d[l] (E, units[l], k[l] + 1) through strides (ws_e, ws_r).
   Unless taps is NULL, each layer's input, pre-activations and their gradient are also copied out,
   as the step layer by layer leaves them: into taps[l] (E, k[l] + 1, B), taps[L + 1 + l] and
   taps[2 (L + 1) + l] (E, units[l], B), all contiguous. Returns 1 where its scratch cannot be
   allocated, else 0 */
int step(i64 L, const float *const *w, const i64 *ws_e, const i64 *ws_r, float *const *d, const i64 *ds_e,
         const i64 *ds_r, const i64 *units, const i64 *k, const float *x, i64 xs_e, i64 xs_r, const float *y,
         i64 ys_e, const float *scale, float *out, i64 outs_e, const int8_t *kinds, float *const *taps, i64 E,
         i64 B) {
  i64 rows = 0, widest = 1;
  for (i64 l = 0; l <= L; l++) {
    rows += k[l] + 1;
    widest = units[l] > widest ? units[l] : widest;
    widest = k[l] > widest ? k[l] : widest;
  }
  float *h = malloc((rows + 3 * widest) * B * sizeof(float)); /* each layer's input [h; 1], z, two gradients */
  v16 *acc = malloc(widest * sizeof(v16));
  if (!h || !acc) {
    free(h);
    free(acc);
    return 1;
  }
  float *z = h + rows * B, *g = z + widest * B, *below = g + widest * B, *hl[L + 1];
  for (i64 l = 0, at = 0; l <= L; at += (k[l] + 1) * B, l++) {
    hl[l] = h + at;
    for (i64 b = 0; b < B; b++) hl[l][k[l] * B + b] = 1.f;
  }
  for (i64 e = 0; e < E; e++) {
    for (i64 c = 0; c < k[0]; c++)
      for (i64 b = 0; b < B; b++) hl[0][c * B + b] = x[e * xs_e + c * xs_r + b];
    for (i64 l = 0; l < L; l++) {
      product(w[l] + e * ws_e[l], ws_r[l], 1, hl[l], B, z, B, units[l], k[l] + 1, B);
      activate(z, B, hl[l + 1], B, units[l], B, kinds[e]);
      if (taps) {
        memcpy(taps[l] + e * (k[l] + 1) * B, hl[l], k[l] * B * sizeof(float));
        memcpy(taps[L + 1 + l] + e * units[l] * B, z, units[l] * B * sizeof(float));
      }
    }
    float *zout = out + e * outs_e;
    product(w[L] + e * ws_e[L], ws_r[L], 1, hl[L], B, zout, B, 1, k[L] + 1, B);
    if (taps) {
      memcpy(taps[L] + e * (k[L] + 1) * B, hl[L], k[L] * B * sizeof(float));
      memcpy(taps[2 * L + 1] + e * B, zout, B * sizeof(float));
    }
    for (i64 b = 0; b < B; b++) g[b] = (sigmoid(zout[b]) - y[e * ys_e + b]) * scale[e];
    for (i64 l = L; l >= 0; l--) {
      if (taps) memcpy(taps[2 * (L + 1) + l] + e * units[l] * B, g, units[l] * B * sizeof(float));
      outer_product(g, B, hl[l], B, d[l] + e * ds_e[l], ds_r[l], units[l], k[l] + 1, B, acc);
      if (l == 0) break;
      product(w[l] + e * ws_e[l], 1, ws_r[l], g, B, below, B, k[l], units[l], B);
      derive(below, B, hl[l], B, k[l], B, kinds[e]);
      float *t = g;
      g = below;
      below = t;
    }
  }
  free(h);
  free(acc);
  return 0;
}
