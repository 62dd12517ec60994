/* lmc kernels, family "cnn": float32 convolution, pooling, matrix products, elementwise and softmax.
 * Portable C99; sums accumulate in float in the natural loop order (MatMul with fused multiply-adds and
 * Softmax as onnxruntime computes them on the host: see lmc_matmul_f32 and lmc_softmax_f32). */
#include <math.h>
#include <string.h>

#include "lmc_kernels_cnn.h"

/* The taps r in [r0, r1) of a window starting at i0 (step dil) that fall inside [0, n). */
static void tap_range(int32_t i0, int32_t dil, int32_t k, int32_t n, int32_t *r0, int32_t *r1)
{
    int32_t lo = 0, hi = k;
    while (lo < k && i0 + lo * dil < 0) ++lo;
    while (hi > lo && i0 + (hi - 1) * dil >= n) --hi;
    *r0 = lo;
    *r1 = hi;
}

/* 1x1, stride 1, no pads, one group: y[co][p] = b[co] + sum_ci w[co][ci] x[ci][p] (summed over ci in order),
 * four pixels at a time (one weight load for four multiply-adds). */
static void conv_pointwise_f32(const float *x, const float *w, const float *bias, float *y,
                               const lmc_conv2d_params *p)
{
    const int32_t hw = p->h_in * p->w_in;
    int32_t n, co, ci, i;
    for (n = 0; n < p->n; ++n) {
        const float *xn = x + (long)n * p->c_in * hw;
        for (co = 0; co < p->c_out; ++co) {
            const float *wc = w + (long)co * p->c_in;
            float *yc = y + ((long)n * p->c_out + co) * hw;
            const float b = bias ? bias[co] : 0.0f;
            for (i = 0; i + 4 <= hw; i += 4) {
                const float *xp = xn + i;
                float a0 = b, a1 = b, a2 = b, a3 = b;
                for (ci = 0; ci < p->c_in; ++ci) {
                    const float wv = wc[ci];
                    const float *xc = xp + (long)ci * hw;
                    a0 += xc[0] * wv;
                    a1 += xc[1] * wv;
                    a2 += xc[2] * wv;
                    a3 += xc[3] * wv;
                }
                yc[i] = lmc_apply_act(a0, &p->act);
                yc[i + 1] = lmc_apply_act(a1, &p->act);
                yc[i + 2] = lmc_apply_act(a2, &p->act);
                yc[i + 3] = lmc_apply_act(a3, &p->act);
            }
            for (; i < hw; ++i) {
                const float *xp = xn + i;
                float acc = b;
                for (ci = 0; ci < p->c_in; ++ci) acc += xp[(long)ci * hw] * wc[ci];
                yc[i] = lmc_apply_act(acc, &p->act);
            }
        }
    }
}

void lmc_conv2d_f32(const float *x, const float *w, const float *bias, float *y, const lmc_conv2d_params *p)
{
    const int32_t cin_g = p->c_in / p->group, cout_g = p->c_out / p->group;
    int32_t n, g, oc, oh, ow, ic, r, s, ow_lo = 0, ow_hi = p->w_out;
    const int dw3 = cin_g == 1 && p->kh == 3 && p->kw == 3 && p->dil_h == 1 && p->dil_w == 1;
    /* output columns [ow_lo, ow_hi) read only columns inside the input: no clipping there */
    while (ow_lo < p->w_out && ow_lo * p->stride_w - p->pad_left < 0) ++ow_lo;
    while (ow_hi > ow_lo && (ow_hi - 1) * p->stride_w - p->pad_left + (p->kw - 1) * p->dil_w >= p->w_in) --ow_hi;
    if (p->kh == 1 && p->kw == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0 && p->pad_left == 0 &&
        p->group == 1 && p->h_out == p->h_in && p->w_out == p->w_in) {
        conv_pointwise_f32(x, w, bias, y, p);
        return;
    }
    for (n = 0; n < p->n; ++n) {
        for (g = 0; g < p->group; ++g) {
            for (oc = 0; oc < cout_g; ++oc) {
                const int32_t co = g * cout_g + oc;
                const float *wc = w + (long)co * cin_g * p->kh * p->kw;
                float *yc = y + ((long)n * p->c_out + co) * p->h_out * p->w_out;
                const float b = bias ? bias[co] : 0.0f;
                for (oh = 0; oh < p->h_out; ++oh) {
                    const int32_t ih0 = oh * p->stride_h - p->pad_top;
                    int32_t r0, r1;
                    tap_range(ih0, p->dil_h, p->kh, p->h_in, &r0, &r1);
                    for (ow = 0; ow < p->w_out; ++ow) {
                        const int32_t iw0 = ow * p->stride_w - p->pad_left;
                        int32_t s0 = 0, s1 = p->kw;
                        float acc = b;
                        if (ow < ow_lo || ow >= ow_hi) tap_range(iw0, p->dil_w, p->kw, p->w_in, &s0, &s1);
                        if (dw3 && r0 == 0 && r1 == 3 && s0 == 0 && s1 == 3) {   /* depthwise 3x3 inside the input */
                            const float *xc = x + ((long)n * p->c_in + g) * p->h_in * p->w_in
                                              + (long)ih0 * p->w_in + iw0;
                            const long w1 = p->w_in, w2 = 2L * p->w_in;
                            acc += xc[0] * wc[0];
                            acc += xc[1] * wc[1];
                            acc += xc[2] * wc[2];
                            acc += xc[w1] * wc[3];
                            acc += xc[w1 + 1] * wc[4];
                            acc += xc[w1 + 2] * wc[5];
                            acc += xc[w2] * wc[6];
                            acc += xc[w2 + 1] * wc[7];
                            acc += xc[w2 + 2] * wc[8];
                            yc[(long)oh * p->w_out + ow] = lmc_apply_act(acc, &p->act);
                            continue;
                        }
                        for (ic = 0; ic < cin_g; ++ic) {
                            const float *xc = x + ((long)n * p->c_in + g * cin_g + ic) * p->h_in * p->w_in;
                            const float *wk = wc + (long)ic * p->kh * p->kw;
                            for (r = r0; r < r1; ++r) {
                                const long row = (long)(ih0 + r * p->dil_h) * p->w_in + iw0;
                                const float *wr = wk + r * p->kw;
                                for (s = s0; s < s1; ++s) acc += xc[row + s * p->dil_w] * wr[s];
                            }
                        }
                        yc[(long)oh * p->w_out + ow] = lmc_apply_act(acc, &p->act);
                    }
                }
            }
        }
    }
}

static void pool2d(const float *x, float *y, const lmc_pool2d_params *p, int is_max)
{
    int32_t plane, oh, ow, r, s;
    const int32_t planes = p->n * p->c;
    for (plane = 0; plane < planes; ++plane) {
        const float *xp = x + (long)plane * p->h_in * p->w_in;
        float *yp = y + (long)plane * p->h_out * p->w_out;
        for (oh = 0; oh < p->h_out; ++oh) {
            const int32_t h0 = oh * p->stride_h - p->pad_top;
            for (ow = 0; ow < p->w_out; ++ow) {
                const int32_t w0 = ow * p->stride_w - p->pad_left;
                float acc = is_max ? -INFINITY : 0.0f;
                int32_t count = 0;
                for (r = 0; r < p->kh; ++r) {
                    const int32_t ih = h0 + r * p->dil_h;
                    if (ih < 0 || ih >= p->h_in) continue;
                    for (s = 0; s < p->kw; ++s) {
                        const int32_t iw = w0 + s * p->dil_w;
                        float v;
                        if (iw < 0 || iw >= p->w_in) continue;
                        v = xp[(long)ih * p->w_in + iw];
                        if (is_max) {
                            if (v > acc || v != v) acc = v;
                        } else {
                            acc += v;
                        }
                        ++count;
                    }
                }
                if (!is_max) {
                    if (p->count_include_pad) {
                        int32_t h1 = h0 + p->kh, w1 = w0 + p->kw;
                        if (h1 > p->h_in + p->pad_bottom) h1 = p->h_in + p->pad_bottom;
                        if (w1 > p->w_in + p->pad_right) w1 = p->w_in + p->pad_right;
                        count = (h1 - h0) * (w1 - w0);
                    }
                    acc = count > 0 ? acc / (float)count : 0.0f;
                }
                yp[(long)oh * p->w_out + ow] = acc;
            }
        }
    }
}

void lmc_maxpool2d_f32(const float *x, float *y, const lmc_pool2d_params *p) { pool2d(x, y, p, 1); }
void lmc_avgpool2d_f32(const float *x, float *y, const lmc_pool2d_params *p) { pool2d(x, y, p, 0); }

void lmc_global_avgpool_f32(const float *x, float *y, int32_t nc, int32_t hw)
{
    int32_t i, j;
    for (i = 0; i < nc; ++i) {
        const float *xp = x + (long)i * hw;
        float acc = 0.0f;
        for (j = 0; j < hw; ++j) acc += xp[j];
        y[i] = acc / (float)hw;
    }
}

void lmc_global_maxpool_f32(const float *x, float *y, int32_t nc, int32_t hw)
{
    int32_t i, j;
    for (i = 0; i < nc; ++i) {
        const float *xp = x + (long)i * hw;
        float acc = -INFINITY;
        for (j = 0; j < hw; ++j)
            if (xp[j] > acc || xp[j] != xp[j]) acc = xp[j];
        y[i] = acc;
    }
}

void lmc_matmul_f32(const float *a, const float *b, float *y, int32_t m, int32_t k, int32_t n, int32_t batch,
                    const int32_t *a_off, const int32_t *b_off)
{
    int32_t bt, i, j, t;
    for (bt = 0; bt < batch; ++bt) {
        const float *ab = a + (a_off ? a_off[bt] : 0);
        const float *bb = b + (b_off ? b_off[bt] : 0);
        float *yb = y + (long)bt * m * n;
        for (i = 0; i < m; ++i) {
            float *yr = yb + (long)i * n;
            const float *ar = ab + (long)i * k;
            for (j = 0; j < n; ++j) yr[j] = 0.0f;
            for (t = 0; t < k; ++t) {
                const float av = ar[t];
                const float *br = bb + (long)t * n;
                for (j = 0; j < n; ++j) yr[j] = fmaf(av, br[j], yr[j]);
            }
        }
    }
}

void lmc_gemm_f32(const float *a, const float *b, const float *c, float *y, const lmc_gemm_params *p)
{
    int32_t i, j, t;
    for (i = 0; i < p->m; ++i) {
        for (j = 0; j < p->n; ++j) {
            float acc = 0.0f, v;
            for (t = 0; t < p->k; ++t) {
                const float av = p->trans_a ? a[(long)t * p->m + i] : a[(long)i * p->k + t];
                const float bv = p->trans_b ? b[(long)j * p->k + t] : b[(long)t * p->n + j];
                acc += av * bv;
            }
            v = p->alpha * acc;
            if (c) v += p->beta * c[(long)i * p->c_rs + (long)j * p->c_cs];
            y[(long)i * p->n + j] = lmc_apply_act(v, &p->act);
        }
    }
}

static float binary(lmc_binary_kind op, float a, float b)
{
    switch (op) {
    case LMC_BIN_ADD: return a + b;
    case LMC_BIN_SUB: return a - b;
    case LMC_BIN_MUL: return a * b;
    case LMC_BIN_DIV: return a / b;
    case LMC_BIN_MAX: return (a > b || a != a) ? a : b;
    case LMC_BIN_MIN: return (a < b || a != a) ? a : b;
    case LMC_BIN_POW: return b == 2.0f ? a * a : powf(a, b);   /* exponent 2: x * x, as onnxruntime */
    default: return 0.0f;
    }
}

void lmc_binary_f32(lmc_binary_kind op, const float *a, const float *b, float *y, const lmc_bcast *g)
{
    int32_t idx[LMC_MAX_DIMS];
    const int32_t nd = g->ndim;
    int32_t d;
    long total = 1, i, ia = 0, ib = 0;
    for (d = 0; d < nd; ++d) {
        idx[d] = 0;
        total *= g->dims[d];
    }
    if (nd == 1 && g->sa[0] == 1 && g->sb[0] == 1) {            /* same shapes */
        for (i = 0; i < total; ++i) y[i] = binary(op, a[i], b[i]);
        return;
    }
    for (i = 0; i < total; ++i) {
        y[i] = binary(op, a[ia], b[ib]);
        for (d = nd - 1; d >= 0; --d) {
            ia += g->sa[d];
            ib += g->sb[d];
            if (++idx[d] < g->dims[d]) break;
            ia -= (long)g->sa[d] * g->dims[d];
            ib -= (long)g->sb[d] * g->dims[d];
            idx[d] = 0;
        }
    }
}

void lmc_activation_f32(const float *x, float *y, int32_t n, const lmc_act *act)
{
    int32_t i;
    if (act->kind == LMC_ACT_RELU) {
        for (i = 0; i < n; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
        return;
    }
    for (i = 0; i < n; ++i) y[i] = lmc_apply_act(x[i], act);
}

void lmc_unary_f32(lmc_unary_kind op, const float *x, float *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        const float v = x[i];
        float r;
        switch (op) {
        case LMC_UN_EXP: r = expf(v); break;
        case LMC_UN_LOG: r = logf(v); break;
        case LMC_UN_SQRT: r = sqrtf(v); break;
        case LMC_UN_NEG: r = -v; break;
        case LMC_UN_ABS: r = fabsf(v); break;
        case LMC_UN_RECIPROCAL: r = 1.0f / v; break;
        case LMC_UN_ERF: r = erff(v); break;
        default: r = v; break;
        }
        y[i] = r;
    }
}

void lmc_channel_affine_f32(const float *x, const float *a, const float *b, float *y, int32_t n, int32_t c,
                            int32_t inner)
{
    int32_t i, j, k;
    long at = 0;
    for (i = 0; i < n; ++i)
        for (j = 0; j < c; ++j) {
            const float aj = a[j], bj = b[j];
            for (k = 0; k < inner; ++k, ++at) y[at] = x[at] * aj + bj;
        }
}

/* exp(v) for v <= 0 as onnxruntime's softmax computes it on the host (MLAS's sum-exp kernel): v clamped below
 * at -88.376, v = m ln2 + r with m = round(v / ln2) (rounding bias 1.5 * 2^23) and r reduced in two fused
 * steps, exp(r) by a degree-6 polynomial in fused multiply-adds, times 2^m built in the exponent field. */
static float mlas_exp_nonpositive(float v)
{
    const float bias = 12582912.0f;
    float biased, m, p, scale;
    uint32_t bits;
    v = (-88.3762626647949f > v) ? -88.3762626647949f : v;
    biased = fmaf(v, 1.44269504088896341f, bias);
    m = biased - bias;
    v = fmaf(m, -6.93145752e-1f, v);
    v = fmaf(m, -1.42860677e-6f, v);
    p = fmaf(0x1.694000p-10f, v, 0x1.125edcp-7f);
    p = fmaf(p, v, 0x1.555b5ap-5f);
    p = fmaf(p, v, 0x1.555450p-3f);
    p = fmaf(p, v, 0x1.fffff6p-2f);
    p = fmaf(p, v, 1.0f);
    p = fmaf(p, v, 1.0f);
    memcpy(&bits, &biased, sizeof bits);
    bits = (bits << 23) + 0x3F800000u;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Softmax along len elements (stride inner) as onnxruntime's MLAS computes it on the host: the maximum,
 * e_j = exp(x_j - max) (mlas_exp_nonpositive), their sum in eight lane accumulators (element j in lane j % 8)
 * joined as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) taken high half first, then y_j = e_j · (1 / sum). */
void lmc_softmax_f32(const float *x, float *y, int32_t outer, int32_t len, int32_t inner)
{
    int32_t o, j, t;
    for (o = 0; o < outer; ++o) {
        for (t = 0; t < inner; ++t) {
            const long base = (long)o * len * inner + t;
            float mx = -3.40282347e+38f, lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, sum, r;
            for (j = 0; j < len; ++j)
                if (x[base + (long)j * inner] > mx) mx = x[base + (long)j * inner];
            for (j = 0; j < len; ++j) {
                const float e = mlas_exp_nonpositive(x[base + (long)j * inner] + -mx);
                y[base + (long)j * inner] = e;
                lanes[j % 8] += e;
            }
            sum = ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]));
            r = 1.0f / sum;
            for (j = 0; j < len; ++j) y[base + (long)j * inner] *= r;
        }
    }
}
