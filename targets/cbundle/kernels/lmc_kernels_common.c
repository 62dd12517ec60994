/* lmc kernels, family "common": copies, strided gathers, activations. */
#include <math.h>
#include <string.h>

#include "lmc_kernels.h"

float lmc_logistic(float x)
{
    float x2, p, q;
    x = x < -18.0f ? -18.0f : (x > 18.0f ? 18.0f : x);
    x2 = x * x;
    p = fmaf(x2, 4.37031012579801e-11f, 1.15627324459942e-07f);
    p = fmaf(x2, p, 6.08574864600143e-05f);
    p = fmaf(x2, p, 8.51377133304701e-03f);
    p = fmaf(x2, p, 2.48287947061529e-01f);
    q = fmaf(x2, 6.10247389755681e-13f, 5.76102136993427e-09f);
    q = fmaf(x2, q, 6.29106785017040e-06f);
    q = fmaf(x2, q, 1.70198817374094e-03f);
    q = fmaf(x2, q, 1.16817656904453e-01f);
    q = fmaf(x2, q, 9.93151921023180e-01f);
    p = x * p;
    p = p / q + 0.5f;
    return p < 0.0f ? 0.0f : p;
}

float lmc_apply_act(float v, const lmc_act *act)
{
    switch (act->kind) {
    case LMC_ACT_RELU:
        return v > 0.0f ? v : 0.0f;
    case LMC_ACT_CLIP:
        return v < act->a ? act->a : (v > act->b ? act->b : v);
    case LMC_ACT_SIGMOID:
        return lmc_logistic(v);
    case LMC_ACT_TANH:
        return tanhf(v);
    case LMC_ACT_LEAKY_RELU:
        return v >= 0.0f ? v : act->a * v;
    case LMC_ACT_HARD_SIGMOID: {
        float h = act->a * v + act->b;
        return h < 0.0f ? 0.0f : (h > 1.0f ? 1.0f : h);
    }
    case LMC_ACT_NONE:
    default:
        return v;
    }
}

void lmc_copy(void *dst, const void *src, size_t bytes)
{
    if (dst != src && bytes > 0) memmove(dst, src, bytes);
}

void lmc_copy_blocks(void *dst, const void *src, int32_t outer, size_t block_bytes, size_t dst_stride_bytes)
{
    unsigned char *d = (unsigned char *)dst;
    const unsigned char *s = (const unsigned char *)src;
    int32_t i;
    for (i = 0; i < outer; ++i) {
        memcpy(d, s, block_bytes);
        d += dst_stride_bytes;
        s += block_bytes;
    }
}

void lmc_gather_strided(void *y, const void *x, size_t elem_bytes, const lmc_bcast *g)
{
    int32_t idx[LMC_MAX_DIMS];
    int32_t nd = g->ndim, d;
    long total = 1, i, src = 0;
    unsigned char *out = (unsigned char *)y;
    const unsigned char *in = (const unsigned char *)x;
    for (d = 0; d < nd; ++d) {
        idx[d] = 0;
        total *= g->dims[d];
    }
    for (i = 0; i < total; ++i) {
        switch (elem_bytes) {
        case 4: ((uint32_t *)(void *)out)[i] = ((const uint32_t *)(const void *)in)[src]; break;
        case 1: out[i] = in[src]; break;
        default: memcpy(out + (size_t)i * elem_bytes, in + (size_t)src * elem_bytes, elem_bytes); break;
        }
        for (d = nd - 1; d >= 0; --d) {
            src += g->sa[d];
            if (++idx[d] < g->dims[d]) break;
            src -= (long)g->sa[d] * g->dims[d];
            idx[d] = 0;
        }
    }
}
