/* lmc kernels, family "quant": QuantizeLinear / DequantizeLinear and float products with int8 weights. */
#include <math.h>

#include "lmc_kernels_quant.h"

#define DEQUANT(NAME, T)                                                                          \
    void NAME(const T *x, const float *scale, const T *zp, float *y, const lmc_qaxis *q)            \
    {                                                                                             \
        int32_t o, a, i;                                                                          \
        long at = 0;                                                                              \
        for (o = 0; o < q->outer; ++o)                                                            \
            for (a = 0; a < q->axis_len; ++a) {                                                   \
                const float s = scale[a];                                                         \
                const int32_t z = zp ? (int32_t)zp[a] : 0;                                        \
                for (i = 0; i < q->inner; ++i, ++at) y[at] = (float)((int32_t)x[at] - z) * s;     \
            }                                                                                     \
    }

DEQUANT(lmc_dequantize_s8, int8_t)
DEQUANT(lmc_dequantize_u8, uint8_t)

void lmc_dequantize_s32(const int32_t *x, const float *scale, const int32_t *zp, float *y, const lmc_qaxis *q)
{
    int32_t o, a, i;
    long at = 0;
    for (o = 0; o < q->outer; ++o)
        for (a = 0; a < q->axis_len; ++a) {
            const float s = scale[a];
            const int32_t z = zp ? zp[a] : 0;
            for (i = 0; i < q->inner; ++i, ++at) y[at] = (float)(x[at] - z) * s;
        }
}

#define QUANT(NAME, T, LO, HI)                                                                    \
    void NAME(const float *x, const float *scale, const T *zp, T *y, const lmc_qaxis *q)            \
    {                                                                                             \
        int32_t o, a, i;                                                                          \
        long at = 0;                                                                              \
        for (o = 0; o < q->outer; ++o)                                                            \
            for (a = 0; a < q->axis_len; ++a) {                                                   \
                const float s = scale[a];                                                         \
                const float z = zp ? (float)zp[a] : 0.0f;                                         \
                for (i = 0; i < q->inner; ++i, ++at) {                                            \
                    float v = nearbyintf(x[at] / s) + z;                                          \
                    v = v < (LO) ? (LO) : (v > (HI) ? (HI) : v);                                  \
                    y[at] = (T)v;                                                                 \
                }                                                                                 \
            }                                                                                     \
    }

QUANT(lmc_quantize_s8, int8_t, -128.0f, 127.0f)
QUANT(lmc_quantize_u8, uint8_t, 0.0f, 255.0f)

void lmc_matmul_f32_w8(const float *a, const int8_t *bq, const float *scale, const int8_t *zp, float *y,
                       int32_t m, int32_t k, int32_t n, int32_t batch, int32_t per_col)
{
    int32_t r, j, t;
    const int32_t rows = m * batch;
    for (r = 0; r < rows; ++r) {
        const float *ar = a + (long)r * k;
        float *yr = y + (long)r * n;
        for (j = 0; j < n; ++j) {
            const int32_t c = per_col ? j : 0;
            const int32_t z = zp ? (int32_t)zp[c] : 0;
            float acc = 0.0f;
            for (t = 0; t < k; ++t) acc += ar[t] * (float)((int32_t)bq[(long)t * n + j] - z);
            yr[j] = acc * scale[c];
        }
    }
}

void lmc_gemm_f32_w8(const float *a, const int8_t *bq, const float *scale, const int8_t *zp, const float *c,
                     float *y, const lmc_gemm_params *p, int32_t per_col)
{
    int32_t i, j, t;
    for (i = 0; i < p->m; ++i) {
        const float *ar = a + (long)i * p->k;
        for (j = 0; j < p->n; ++j) {
            const int32_t col = per_col ? j : 0;
            const int32_t z = zp ? (int32_t)zp[col] : 0;
            float acc = 0.0f, v;
            for (t = 0; t < p->k; ++t) {
                const int32_t q = p->trans_b ? bq[(long)j * p->k + t] : bq[(long)t * p->n + j];
                acc += ar[t] * (float)(q - z);
            }
            v = p->alpha * (acc * scale[col]);
            if (c) v += p->beta * c[(long)i * p->c_rs + (long)j * p->c_cs];
            y[(long)i * p->n + j] = lmc_apply_act(v, &p->act);
        }
    }
}
