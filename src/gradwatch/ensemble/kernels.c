/* Small batched matmuls for stacked MLPs: thousands of 10 x 11 by 11 x 32 products a step.

   MKL's batched GEMM pays a per-matrix setup that is about half of such a product's time; these loops
   keep each member's few rows in registers instead, with GCC/Clang vector types (16 floats: one
   AVX-512 register, two AVX2 ones, four NEON ones; the compiler picks). Float32, the last dimension
   of every operand contiguous, any member and row strides. See kernels.py. */

#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef int64_t i64;
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
enum { ROWS = 8 }; /* output rows kept in registers at once */

/* ROWS rows of y (r of them valid), WIDTH columns: y[j, :] = sum_c w[j ws_r + c ws_c] x[c, :] */
#define TILE(V, WIDTH)                                                                                 \
  static inline void tile##WIDTH(const float *w, i64 ws_r, i64 ws_c, const float *x, i64 xs_r,       \
                                 float *y, i64 ys_r, i64 r, i64 C) {                                 \
    V acc[ROWS] = {0};                                                                               \
    for (i64 c = 0; c < C; c++) {                                                                    \
      V xv = *(const V *)(x + c * xs_r);                                                             \
      for (int j = 0; j < ROWS; j++)                                                                 \
        if (j < r) acc[j] += w[j * ws_r + c * ws_c] * xv;                                            \
    }                                                                                                \
    for (int j = 0; j < ROWS; j++)                                                                   \
      if (j < r) *(V *)(y + j * ys_r) = acc[j];                                                      \
  }
TILE(v16, 16)
TILE(v8, 8)

/* one member: y (R, B) = w (R, C) x (C, B), w read through strides (a transposed view is free) */
static void product(const float *w, i64 ws_r, i64 ws_c, const float *x, i64 xs_r, float *y, i64 ys_r, i64 R,
                    i64 C, i64 B) {
  for (i64 i = 0; i < R; i += ROWS) {
    i64 r = R - i < ROWS ? R - i : ROWS, b = 0;
    const float *wi = w + i * ws_r;
    float *yi = y + i * ys_r;
    for (; b + 16 <= B; b += 16) tile16(wi, ws_r, ws_c, x + b, xs_r, yi + b, ys_r, r, C);
    for (; b + 8 <= B; b += 8) tile8(wi, ws_r, ws_c, x + b, xs_r, yi + b, ys_r, r, C);
    for (; b < B; b++)
      for (i64 j = 0; j < r; j++) {
        float s = 0.f;
        for (i64 c = 0; c < C; c++) s += wi[j * ws_r + c * ws_c] * x[c * xs_r + b];
        yi[j * ys_r + b] = s;
      }
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

/* the first n lanes of v at out: one masked store where the CPU has them */
static inline void put(float *out, v16 v, i64 n) {
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
      for (int j = 0; j < 16; j++) {
        const float *row = h + (k + j) * hs_r + b;
        if (j >= rows)
          r[j] = (v16){0};
        else if (n == 16)
          r[j] = *(const v16 *)row;
        else
          for (int l = 0; l < 16; l++) r[j][l] = l < n ? row[l] : 0.f;
      }
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

/* y[e] = w[e] x[e] for every member: w (E, R, C) through strides (ws_e, ws_r, ws_c); x (E, C, B), y (E, R, B) */
void matmul(const float *w, i64 ws_e, i64 ws_r, i64 ws_c, const float *x, i64 xs_e, i64 xs_r, float *y, i64 ys_e,
            i64 ys_r, i64 E, i64 R, i64 C, i64 B) {
  for (i64 e = 0; e < E; e++) product(w + e * ws_e, ws_r, ws_c, x + e * xs_e, xs_r, y + e * ys_e, ys_r, R, C, B);
}

/* A Dense layer's backward for every member, g (E, O, B) read once while it is in cache:
   d[e] = g[e] h[e]^T (d (E, O, K), h (E, K, B): the weight gradient) and, unless dh is NULL,
   dh[e] = w[e]^T g[e] (w (E, O, C) with rows ws_r apart, dh (E, C, B): the input's gradient).
   Returns 1 where its buffer of sums cannot be allocated, else 0 */
int backward(const float *g, i64 gs_e, i64 gs_r, const float *h, i64 hs_e, i64 hs_r, float *d, i64 ds_e, i64 ds_r,
             const float *w, i64 ws_e, i64 ws_r, float *dh, i64 dhs_e, i64 dhs_r, i64 E, i64 O, i64 K, i64 C,
             i64 B) {
  v16 *acc = malloc(O * sizeof(v16));
  if (!acc) return 1;
  for (i64 e = 0; e < E; e++) {
    const float *ge = g + e * gs_e;
    outer_product(ge, gs_r, h + e * hs_e, hs_r, d + e * ds_e, ds_r, O, K, B, acc);
    if (dh) product(w + e * ws_e, 1, ws_r, ge, gs_r, dh + e * dhs_e, dhs_r, C, O, B);
  }
  free(acc);
  return 0;
}
