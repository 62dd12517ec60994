/* lmc kernels, family "int8": integer operators on int8 activations, requantized as onnxruntime does. */
#include <math.h>

#include "lmc_kernels_int8.h"

int8_t lmc_requantize_s8(int32_t acc, float scale, int32_t zero)
{
    float v = (float)acc * scale;
    const float lo = (float)(-128 - zero), hi = (float)(127 - zero);
    v = v < lo ? lo : (v > hi ? hi : v);
    return (int8_t)((int32_t)nearbyintf(v) + zero);
}

static void tap_range(int32_t i0, int32_t dil, int32_t k, int32_t n, int32_t *r0, int32_t *r1)
{
    int32_t lo = 0, hi = k;
    while (lo < k && i0 + lo * dil < 0) ++lo;
    while (hi > lo && i0 + (hi - 1) * dil >= n) --hi;
    *r0 = lo;
    *r1 = hi;
}

/* 1x1, stride 1, no pads, one group: acc = b + sum_ci (x - xz)(w - wz) = b + sum x(w - wz) - xz sum (w - wz). */
static void qconv_pointwise_s8(const int8_t *x, const int8_t *w, const int8_t *w_zero, const int32_t *bias,
                               const float *scale, int8_t *y, const lmc_qconv_params *qp)
{
    const lmc_conv2d_params *p = &qp->g;
    const int32_t hw = p->h_in * p->w_in;
    int32_t n, co, ci, i;
    for (n = 0; n < p->n; ++n) {
        const int8_t *xn = x + (long)n * p->c_in * hw;
        for (co = 0; co < p->c_out; ++co) {
            const int8_t *wc = w + (long)co * p->c_in;
            const int32_t wz = w_zero ? (int32_t)w_zero[co] : 0;
            int32_t wsum = 0, base;
            int8_t *yc = y + ((long)n * p->c_out + co) * hw;
            for (ci = 0; ci < p->c_in; ++ci) wsum += (int32_t)wc[ci] - wz;
            base = (bias ? bias[co] : 0) - qp->x_zero * wsum;
            for (i = 0; i + 4 <= hw; i += 4) {             /* four pixels at a time: one weight load each */
                const int8_t *xp = xn + i;
                int32_t a0 = base, a1 = base, a2 = base, a3 = base;
                for (ci = 0; ci < p->c_in; ++ci) {
                    const int32_t wv = (int32_t)wc[ci] - wz;
                    const int8_t *xc = xp + (long)ci * hw;
                    a0 += (int32_t)xc[0] * wv;
                    a1 += (int32_t)xc[1] * wv;
                    a2 += (int32_t)xc[2] * wv;
                    a3 += (int32_t)xc[3] * wv;
                }
                yc[i] = lmc_requantize_s8(a0, scale[co], qp->y_zero);
                yc[i + 1] = lmc_requantize_s8(a1, scale[co], qp->y_zero);
                yc[i + 2] = lmc_requantize_s8(a2, scale[co], qp->y_zero);
                yc[i + 3] = lmc_requantize_s8(a3, scale[co], qp->y_zero);
            }
            for (; i < hw; ++i) {
                const int8_t *xp = xn + i;
                int32_t acc = base;
                for (ci = 0; ci < p->c_in; ++ci) acc += (int32_t)xp[(long)ci * hw] * ((int32_t)wc[ci] - wz);
                yc[i] = lmc_requantize_s8(acc, scale[co], qp->y_zero);
            }
        }
    }
}

void lmc_qlinear_conv_s8(const int8_t *x, const int8_t *w, const int8_t *w_zero, const int32_t *bias,
                         const float *scale, int8_t *y, const lmc_qconv_params *qp)
{
    const lmc_conv2d_params *p = &qp->g;
    const int32_t cin_g = p->c_in / p->group, cout_g = p->c_out / p->group, xz = qp->x_zero;
    int32_t n, g, oc, oh, ow, ic, r, s, ow_lo = 0, ow_hi = p->w_out;
    const int dw3 = cin_g == 1 && p->kh == 3 && p->kw == 3 && p->dil_h == 1 && p->dil_w == 1;
    /* output columns [ow_lo, ow_hi) read only columns inside the input: no clipping there */
    while (ow_lo < p->w_out && ow_lo * p->stride_w - p->pad_left < 0) ++ow_lo;
    while (ow_hi > ow_lo && (ow_hi - 1) * p->stride_w - p->pad_left + (p->kw - 1) * p->dil_w >= p->w_in) --ow_hi;
    if (p->kh == 1 && p->kw == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0 && p->pad_left == 0 &&
        p->group == 1 && p->h_out == p->h_in && p->w_out == p->w_in) {
        qconv_pointwise_s8(x, w, w_zero, bias, scale, y, qp);
        return;
    }
    for (n = 0; n < p->n; ++n) {
        for (g = 0; g < p->group; ++g) {
            for (oc = 0; oc < cout_g; ++oc) {
                const int32_t co = g * cout_g + oc;
                const int8_t *wc = w + (long)co * cin_g * p->kh * p->kw;
                const int32_t wz = w_zero ? (int32_t)w_zero[co] : 0;
                const int32_t b = bias ? bias[co] : 0;
                const float sc = scale[co];
                int8_t *yc = y + ((long)n * p->c_out + co) * p->h_out * p->w_out;
                int32_t wd[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, wdsum = 0;     /* depthwise 3x3: w - w_zero */
                if (dw3)
                    for (r = 0; r < 9; ++r) {
                        wd[r] = (int32_t)wc[r] - wz;
                        wdsum += wd[r];
                    }
                for (oh = 0; oh < p->h_out; ++oh) {
                    const int32_t ih0 = oh * p->stride_h - p->pad_top;
                    int32_t r0, r1;
                    tap_range(ih0, p->dil_h, p->kh, p->h_in, &r0, &r1);
                    for (ow = 0; ow < p->w_out; ++ow) {
                        const int32_t iw0 = ow * p->stride_w - p->pad_left;
                        int32_t s0 = 0, s1 = p->kw;
                        int32_t acc = b;
                        if (ow < ow_lo || ow >= ow_hi) tap_range(iw0, p->dil_w, p->kw, p->w_in, &s0, &s1);
                        if (dw3 && r0 == 0 && r1 == 3 && s0 == 0 && s1 == 3) {   /* depthwise 3x3 inside the input */
                            const int8_t *xc = x + ((long)n * p->c_in + g) * p->h_in * p->w_in
                                               + (long)ih0 * p->w_in + iw0;
                            const long w1 = p->w_in, w2 = 2L * p->w_in;
                            acc += (int32_t)xc[0] * wd[0] + (int32_t)xc[1] * wd[1] + (int32_t)xc[2] * wd[2]
                                 + (int32_t)xc[w1] * wd[3] + (int32_t)xc[w1 + 1] * wd[4] + (int32_t)xc[w1 + 2] * wd[5]
                                 + (int32_t)xc[w2] * wd[6] + (int32_t)xc[w2 + 1] * wd[7] + (int32_t)xc[w2 + 2] * wd[8]
                                 - xz * wdsum;
                            yc[(long)oh * p->w_out + ow] = lmc_requantize_s8(acc, sc, qp->y_zero);
                            continue;
                        }
                        for (ic = 0; ic < cin_g; ++ic) {   /* taps in the padding hold x_zero: they add 0 */
                            const int8_t *xc = x + ((long)n * p->c_in + g * cin_g + ic) * p->h_in * p->w_in;
                            const int8_t *wk = wc + (long)ic * p->kh * p->kw;
                            for (r = r0; r < r1; ++r) {
                                const long row = (long)(ih0 + r * p->dil_h) * p->w_in + iw0;
                                const int8_t *wr = wk + r * p->kw;
                                for (s = s0; s < s1; ++s)
                                    acc += ((int32_t)xc[row + s * p->dil_w] - xz) * ((int32_t)wr[s] - wz);
                            }
                        }
                        yc[(long)oh * p->w_out + ow] = lmc_requantize_s8(acc, sc, qp->y_zero);
                    }
                }
            }
        }
    }
}

void lmc_qgemm_s8(const int8_t *a, const int8_t *b, const int8_t *b_zero, const int32_t *bias, const float *scale,
                  float *y_f32, int8_t *y_s8, const lmc_qgemm_params *p)
{
    int32_t i, j, t;
    for (i = 0; i < p->m; ++i) {
        const int8_t *ar = a + (long)i * p->k;
        for (j = 0; j < p->n; ++j) {
            const int32_t bz = b_zero ? (int32_t)b_zero[j] : 0;
            int32_t acc = bias ? bias[j] : 0;
            for (t = 0; t < p->k; ++t) {
                const int32_t bv = p->trans_b ? b[(long)j * p->k + t] : b[(long)t * p->n + j];
                acc += ((int32_t)ar[t] - p->a_zero) * (bv - bz);
            }
            if (y_f32) y_f32[(long)i * p->n + j] = (float)acc * scale[j];
            else y_s8[(long)i * p->n + j] = lmc_requantize_s8(acc, scale[j], p->y_zero);
        }
    }
}

void lmc_qlinear_add_s8(const int8_t *a, int32_t a_zero, float ra, const int8_t *b, int32_t b_zero, float rb,
                        int8_t *y, int32_t y_zero, int32_t n)
{
    int32_t i;
    const float lo = (float)(-128 - y_zero), hi = (float)(127 - y_zero);
    for (i = 0; i < n; ++i) {
        float v = (float)((int32_t)a[i] - a_zero) * ra + (float)((int32_t)b[i] - b_zero) * rb;
        v = v < lo ? lo : (v > hi ? hi : v);
        y[i] = (int8_t)((int32_t)nearbyintf(v) + y_zero);
    }
}

void lmc_qlinear_mul_s8(const int8_t *a, int32_t a_zero, const int8_t *b, int32_t b_zero, float ratio,
                        int8_t *y, int32_t y_zero, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i)
        y[i] = lmc_requantize_s8(((int32_t)a[i] - a_zero) * ((int32_t)b[i] - b_zero), ratio, y_zero);
}

void lmc_lookup_s8(const int8_t *x, const int8_t *table, int8_t *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) y[i] = table[(int32_t)x[i] + 128];
}

void lmc_qglobal_avgpool_s8(const int8_t *x, int32_t x_zero, float scale, int8_t *y, int32_t y_zero,
                            int32_t nc, int32_t hw)
{
    int32_t i, j;
    for (i = 0; i < nc; ++i) {
        const int8_t *xp = x + (long)i * hw;
        int32_t acc = -x_zero * hw;
        for (j = 0; j < hw; ++j) acc += xp[j];
        y[i] = lmc_requantize_s8(acc, scale, y_zero);
    }
}

void lmc_maxpool2d_s8(const int8_t *x, int8_t *y, const lmc_pool2d_params *p)
{
    int32_t plane, oh, ow, r, s;
    const int32_t planes = p->n * p->c;
    for (plane = 0; plane < planes; ++plane) {
        const int8_t *xp = x + (long)plane * p->h_in * p->w_in;
        int8_t *yp = y + (long)plane * p->h_out * p->w_out;
        for (oh = 0; oh < p->h_out; ++oh) {
            const int32_t h0 = oh * p->stride_h - p->pad_top;
            for (ow = 0; ow < p->w_out; ++ow) {
                const int32_t w0 = ow * p->stride_w - p->pad_left;
                int32_t acc = -128;
                for (r = 0; r < p->kh; ++r) {
                    const int32_t ih = h0 + r * p->dil_h;
                    if (ih < 0 || ih >= p->h_in) continue;
                    for (s = 0; s < p->kw; ++s) {
                        const int32_t iw = w0 + s * p->dil_w;
                        if (iw < 0 || iw >= p->w_in) continue;
                        if (xp[(long)ih * p->w_in + iw] > acc) acc = xp[(long)ih * p->w_in + iw];
                    }
                }
                yp[(long)oh * p->w_out + ow] = (int8_t)acc;
            }
        }
    }
}
