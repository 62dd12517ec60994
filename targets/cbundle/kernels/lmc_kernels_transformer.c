/* lmc C bundle: transformer kernels (see lmc_kernels_transformer.h for the conventions).
 *
 * Math, as the ONNX operators define it:
 *   MatMul   y[m, n] = sum_k a[m, k] b[k, n] per broadcast batch (float32, k ascending, fused multiply-adds
 *            as onnxruntime's SGEMM on the host);
 *   Sin/Cos  onnxruntime's own approximations (lmc_tf_sincos);
 *   Softmax  y_i = exp(x_i - max x) / sum_j exp(x_j - max x) (the Attention kernel's; the Softmax op is the
 *            family cnn's, rounded as onnxruntime);
 *   Sigmoid  onnxruntime's logistic (lmc_logistic);
 *   ReduceMean = sum / r (a contiguous sum of 4k terms in onnxruntime's order: lmc_tf_sum_lanes);
 *   Pow with exponent 2 is x * x (as onnxruntime's fast path), else powf;
 *   Attention softmax(scale * q k^T + mask) v per head, grouped-query heads sharing kv heads.
 * Preconditions: static shapes with rank <= LMC_TF_MAX_RANK; output buffers do not overlap inputs except
 * where a kernel says so (elementwise ops may run in place: y == a). */
#include "lmc_kernels_transformer.h"

#include <math.h>
#include <string.h>

/* Advance the multi-index idx over shape[0..rank-2] (the last dim is each kernel's inner loop); adds each
 * operand's stride change to its offset. Returns 0 when the iteration is over. */
static int lmc_tf_next(int32_t *idx, const int32_t *shape, int rank, const int32_t *const *strides,
                       int64_t *offs, int nops)
{
    int d, o;
    for (d = rank - 2; d >= 0; --d) {
        if (++idx[d] < shape[d]) {
            for (o = 0; o < nops; ++o) offs[o] += strides[o][d];
            return 1;
        }
        idx[d] = 0;
        for (o = 0; o < nops; ++o) offs[o] -= (int64_t)strides[o][d] * (shape[d] - 1);
    }
    return 0;
}

static int32_t lmc_tf_count(const int32_t *shape, int rank)
{
    int32_t n = 1;
    int d;
    for (d = 0; d < rank; ++d) n *= shape[d];
    return n;
}

static float lmc_tf_apply_f32(int op, float a, float b)
{
    switch (op) {
    case LMC_TF_ADD: return a + b;
    case LMC_TF_SUB: return a - b;
    case LMC_TF_MUL: return a * b;
    case LMC_TF_DIV: return a / b;
    case LMC_TF_POW: return b == 2.0f ? a * a : (b == 1.0f ? a : (b == 0.5f ? sqrtf(a) : powf(a, b)));
    case LMC_TF_MAX: return a > b ? a : b;
    case LMC_TF_MOD: return fmodf(a, b);
    default: return a < b ? a : b;
    }
}

static int64_t lmc_tf_apply_i64(int op, int64_t a, int64_t b)
{
    switch (op) {
    case LMC_TF_ADD: return a + b;
    case LMC_TF_SUB: return a - b;
    case LMC_TF_MUL: return a * b;
    case LMC_TF_DIV: return b == 0 ? 0 : a / b;
    case LMC_TF_MAX: return a > b ? a : b;
    case LMC_TF_MIN: return a < b ? a : b;
    case LMC_TF_MOD: {
        int64_t r;
        if (b == 0) return 0;
        r = a % b;
        return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
    }
    default: {            /* POW with a non-negative integer exponent */
        int64_t r = 1;
        while (b-- > 0) r *= a;
        return r;
    }
    }
}

#define LMC_TF_COMPARE(op, a, b) \
    ((op) == LMC_TF_EQUAL ? (a) == (b) : (op) == LMC_TF_LESS ? (a) < (b) : (op) == LMC_TF_LESS_OR_EQUAL ? (a) <= (b) \
     : (op) == LMC_TF_GREATER ? (a) > (b) : (a) >= (b))

/* One broadcast loop over two operands and the dense output, body(out_index, a_offset, b_offset). */
#define LMC_TF_BROADCAST2(shape, rank, sa, sb, BODY)                                             \
    do {                                                                                         \
        int32_t idx_[LMC_TF_MAX_RANK] = {0};                                                     \
        int64_t offs_[2] = {0, 0};                                                               \
        const int32_t *str_[2];                                                                  \
        int32_t inner_ = (rank) > 0 ? (shape)[(rank) - 1] : 1;                                   \
        int32_t ia_ = (rank) > 0 ? (sa)[(rank) - 1] : 0, ib_ = (rank) > 0 ? (sb)[(rank) - 1] : 0; \
        int64_t out_ = 0;                                                                        \
        str_[0] = (sa);                                                                          \
        str_[1] = (sb);                                                                          \
        if (lmc_tf_count((shape), (rank)) == 0) break;                                           \
        do {                                                                                     \
            int64_t pa_ = offs_[0], pb_ = offs_[1];                                              \
            int32_t j_;                                                                          \
            for (j_ = 0; j_ < inner_; ++j_, ++out_, pa_ += ia_, pb_ += ib_) { BODY }             \
        } while (lmc_tf_next(idx_, (shape), (rank), str_, offs_, 2));                           \
    } while (0)

void lmc_tf_binary_f32(int op, const float *a, const int32_t *sa, const float *b, const int32_t *sb, float *y,
                       const int32_t *shape, int rank)
{
    LMC_TF_BROADCAST2(shape, rank, sa, sb, { y[out_] = lmc_tf_apply_f32(op, a[pa_], b[pb_]); });
}

void lmc_tf_binary_i64(int op, const int64_t *a, const int32_t *sa, const int64_t *b, const int32_t *sb, int64_t *y,
                       const int32_t *shape, int rank)
{
    LMC_TF_BROADCAST2(shape, rank, sa, sb, { y[out_] = lmc_tf_apply_i64(op, a[pa_], b[pb_]); });
}

void lmc_tf_compare_f32(int op, const float *a, const int32_t *sa, const float *b, const int32_t *sb, uint8_t *y,
                        const int32_t *shape, int rank)
{
    LMC_TF_BROADCAST2(shape, rank, sa, sb, { y[out_] = (uint8_t)(LMC_TF_COMPARE(op, a[pa_], b[pb_])); });
}

void lmc_tf_compare_i64(int op, const int64_t *a, const int32_t *sa, const int64_t *b, const int32_t *sb,
                        uint8_t *y, const int32_t *shape, int rank)
{
    LMC_TF_BROADCAST2(shape, rank, sa, sb, { y[out_] = (uint8_t)(LMC_TF_COMPARE(op, a[pa_], b[pb_])); });
}

void lmc_tf_logical(int op, const uint8_t *a, const int32_t *sa, const uint8_t *b, const int32_t *sb, uint8_t *y,
                    const int32_t *shape, int rank)
{
    LMC_TF_BROADCAST2(shape, rank, sa, sb, {
        int x_ = a[pa_] != 0;
        int z_ = b[pb_] != 0;
        y[out_] = (uint8_t)(op == LMC_TF_AND ? (x_ && z_) : op == LMC_TF_OR ? (x_ || z_) : (x_ != z_));
    });
}

void lmc_tf_where(const uint8_t *cond, const int32_t *sc, const void *x, const int32_t *sx, const void *z,
                  const int32_t *sz, void *y, const int32_t *shape, int rank, int32_t elem_size)
{
    int32_t idx[LMC_TF_MAX_RANK] = {0};
    int64_t offs[3] = {0, 0, 0}, out = 0;
    const int32_t *str[3];
    int32_t inner = rank > 0 ? shape[rank - 1] : 1, j;
    const uint8_t *xb = (const uint8_t *)x, *zb = (const uint8_t *)z;
    uint8_t *yb = (uint8_t *)y;
    str[0] = sc;
    str[1] = sx;
    str[2] = sz;
    if (lmc_tf_count(shape, rank) == 0) return;
    do {
        for (j = 0; j < inner; ++j, ++out) {
            int64_t d = rank > 0 ? (int64_t)j : 0;
            int64_t pc = offs[0] + d * (rank > 0 ? sc[rank - 1] : 0);
            const uint8_t *src = cond[pc] ? xb + (offs[1] + d * (rank > 0 ? sx[rank - 1] : 0)) * elem_size
                                          : zb + (offs[2] + d * (rank > 0 ? sz[rank - 1] : 0)) * elem_size;
            memcpy(yb + out * elem_size, src, (size_t)elem_size);
        }
    } while (lmc_tf_next(idx, shape, rank, str, offs, 3));
}

static float lmc_tf_sigmoid(float x)
{
    return lmc_logistic(x);
}

static float lmc_tf_madd(float a, float b, float c)
{
    const float t = a * b;    /* two roundings, as a multiply then an add (no contraction across statements) */
    return t + c;
}

/* sin / cos as onnxruntime computes them on the host (Eigen's vectorised psincos without FMA): x reduced by
 * the nearest multiple of pi/2 in four steps, a degree-8 cosine or degree-7 sine polynomial on [-pi/4, pi/4],
 * the sign from the quadrant. Beyond |x| of 25966 (sin) / 18838 (cos) libm (Eigen reduces those apart). */
static float lmc_tf_sincos(float v, int sine)
{
    static const float reduce[4] = {-1.5703125f, -0.000483989715576171875f, 1.62865035235881805419921875e-07f,
                                    5.5644315544167710640977020375430583953857421875e-11f};
    const float ax = fabsf(v);
    float y, r, x, x2, p, q;
    uint32_t yi, sign, bits;
    int k;
    if (!(ax < (sine ? 25966.0f : 18838.0f))) return sine ? sinf(v) : cosf(v);
    r = ax * 0.636619746685028076171875f + 12582912.0f;
    memcpy(&yi, &r, sizeof yi);
    y = r - 12582912.0f;
    x = ax;
    for (k = 0; k < 4; ++k) x = lmc_tf_madd(y, reduce[k], x);
    memcpy(&bits, &v, sizeof bits);
    sign = (sine ? (bits ^ (yi << 30)) : ((yi + 1u) << 30)) & 0x80000000u;
    x2 = x * x;
    p = 2.4372266125283204019069671630859375e-05f;
    p = lmc_tf_madd(p, x2, -0.00138865201734006404876708984375f);
    p = lmc_tf_madd(p, x2, 0.041666619479656219482421875f);
    p = lmc_tf_madd(p, x2, -0.5f);
    p = lmc_tf_madd(p, x2, 1.0f);
    q = -0.0001959234114083702898469196984621021329076029360294342041015625f;
    q = lmc_tf_madd(q, x2, 0.0083326873655616851693794799871284340042620897293090820312500000f);
    q = lmc_tf_madd(q, x2, -0.1666666203982298255503735617821803316473960876464843750000000000f);
    q = q * x2;
    q = lmc_tf_madd(q, x, x);
    r = ((yi & 1u) == 0) == (sine != 0) ? q : p;
    memcpy(&bits, &r, sizeof bits);
    bits ^= sign;
    memcpy(&r, &bits, sizeof r);
    return r;
}

void lmc_tf_unary_f32(int op, const float *x, float *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        float v = x[i];
        switch (op) {
        case LMC_TF_NEG: y[i] = -v; break;
        case LMC_TF_SQRT: y[i] = sqrtf(v); break;
        case LMC_TF_SIGMOID: y[i] = lmc_tf_sigmoid(v); break;
        case LMC_TF_COS: y[i] = lmc_tf_sincos(v, 0); break;
        case LMC_TF_SIN: y[i] = lmc_tf_sincos(v, 1); break;
        case LMC_TF_EXP: y[i] = expf(v); break;
        case LMC_TF_RECIPROCAL: y[i] = 1.0f / v; break;
        case LMC_TF_ABS: y[i] = fabsf(v); break;
        case LMC_TF_TANH: y[i] = tanhf(v); break;
        case LMC_TF_RELU: y[i] = v > 0.0f ? v : 0.0f; break;
        case LMC_TF_SILU: y[i] = v * lmc_tf_sigmoid(v); break;
        default: y[i] = v; break;
        }
    }
}

void lmc_tf_neg_i64(const int64_t *x, int64_t *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) y[i] = -x[i];
}

void lmc_tf_not(const uint8_t *x, uint8_t *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) y[i] = (uint8_t)(x[i] == 0);
}

void lmc_tf_isnan_f32(const float *x, uint8_t *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) y[i] = (uint8_t)(x[i] != x[i]);
}

static double lmc_tf_load(const void *x, int type, int32_t i)
{
    switch (type) {
    case LMC_TF_FLOAT: return ((const float *)x)[i];
    case LMC_TF_UINT8: case LMC_TF_BOOL: return ((const uint8_t *)x)[i];
    case LMC_TF_INT8: return ((const int8_t *)x)[i];
    case LMC_TF_INT32: return ((const int32_t *)x)[i];
    default: return (double)((const int64_t *)x)[i];
    }
}

void lmc_tf_cast(const void *x, int from, void *y, int to, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        if (from == LMC_TF_INT64 && to == LMC_TF_INT64) {
            ((int64_t *)y)[i] = ((const int64_t *)x)[i];
            continue;
        }
        {
            double v = lmc_tf_load(x, from, i);
            switch (to) {
            case LMC_TF_FLOAT: ((float *)y)[i] = (float)v; break;
            case LMC_TF_BOOL: ((uint8_t *)y)[i] = (uint8_t)(v != 0.0); break;
            case LMC_TF_UINT8: ((uint8_t *)y)[i] = (uint8_t)(int32_t)v; break;
            case LMC_TF_INT8: ((int8_t *)y)[i] = (int8_t)(int32_t)v; break;
            case LMC_TF_INT32: ((int32_t *)y)[i] = (int32_t)v; break;
            default:
                ((int64_t *)y)[i] = from == LMC_TF_INT32 ? ((const int32_t *)x)[i] : (int64_t)v;
                break;
            }
        }
    }
}

void lmc_tf_matmul_f32(const float *a, const int32_t *sa, const float *b, const int32_t *sb, float *y,
                       const int32_t *bshape, int brank, int32_t m, int32_t k, int32_t n)
{
    int32_t idx[LMC_TF_MAX_RANK] = {0};
    int32_t shape[LMC_TF_MAX_RANK + 1];
    int32_t stra[LMC_TF_MAX_RANK + 1], strb[LMC_TF_MAX_RANK + 1];
    int64_t offs[2] = {0, 0};
    const int32_t *str[2];
    int d, r = brank + 1;
    int32_t i, j, p;
    /* iterate the batch dims with a dummy inner dim of 1, so lmc_tf_next walks every batch index */
    for (d = 0; d < brank; ++d) {
        shape[d] = bshape[d];
        stra[d] = sa[d];
        strb[d] = sb[d];
    }
    shape[brank] = 1;
    stra[brank] = 0;
    strb[brank] = 0;
    str[0] = stra;
    str[1] = strb;
    if (lmc_tf_count(shape, r) == 0 || m == 0 || n == 0) return;
    do {
        const float *pa = a + offs[0], *pb = b + offs[1];
        for (i = 0; i < m; ++i) {
            float *row = y + (int64_t)i * n;
            for (j = 0; j < n; ++j) row[j] = 0.0f;
            for (p = 0; p < k; ++p) {
                float av = pa[(int64_t)i * k + p];
                const float *brow = pb + (int64_t)p * n;
                for (j = 0; j < n; ++j) row[j] = fmaf(av, brow[j], row[j]);
            }
        }
        y += (int64_t)m * n;
    } while (lmc_tf_next(idx, shape, r, str, offs, 2));
}

int lmc_tf_gather_i64(const void *data, const int64_t *idx, void *y, int32_t outer, int32_t axis_dim,
                      int32_t inner_bytes, int32_t nidx)
{
    const uint8_t *src = (const uint8_t *)data;
    uint8_t *dst = (uint8_t *)y;
    int32_t o, i;
    for (o = 0; o < outer; ++o) {
        for (i = 0; i < nidx; ++i) {
            int64_t at = idx[i];
            if (at < 0) at += axis_dim;
            if (at < 0 || at >= axis_dim) return LMC_TF_INDEX_OUT_OF_RANGE;
            memcpy(dst, src + ((int64_t)o * axis_dim + at) * inner_bytes, (size_t)inner_bytes);
            dst += inner_bytes;
        }
    }
    return LMC_TF_OK;
}

int lmc_tf_gather_i32(const void *data, const int32_t *idx, void *y, int32_t outer, int32_t axis_dim,
                      int32_t inner_bytes, int32_t nidx)
{
    const uint8_t *src = (const uint8_t *)data;
    uint8_t *dst = (uint8_t *)y;
    int32_t o, i;
    for (o = 0; o < outer; ++o) {
        for (i = 0; i < nidx; ++i) {
            int64_t at = idx[i];
            if (at < 0) at += axis_dim;
            if (at < 0 || at >= axis_dim) return LMC_TF_INDEX_OUT_OF_RANGE;
            memcpy(dst, src + ((int64_t)o * axis_dim + at) * inner_bytes, (size_t)inner_bytes);
            dst += inner_bytes;
        }
    }
    return LMC_TF_OK;
}

int lmc_tf_gather_elements(const void *data, const int32_t *dstrides, const int64_t *idx, void *y,
                           const int32_t *shape, int rank, int axis, int32_t axis_dim, int32_t elem_size)
{
    int32_t at[LMC_TF_MAX_RANK] = {0};
    int32_t total = lmc_tf_count(shape, rank), i;
    int d;
    const uint8_t *src = (const uint8_t *)data;
    uint8_t *dst = (uint8_t *)y;
    for (i = 0; i < total; ++i) {
        int64_t off = 0, v = idx[i];
        if (v < 0) v += axis_dim;
        if (v < 0 || v >= axis_dim) return LMC_TF_INDEX_OUT_OF_RANGE;
        for (d = 0; d < rank; ++d) off += (int64_t)(d == axis ? v : at[d]) * dstrides[d];
        memcpy(dst + (int64_t)i * elem_size, src + off * elem_size, (size_t)elem_size);
        for (d = rank - 1; d >= 0; --d) {           /* next index of the output */
            if (++at[d] < shape[d]) break;
            at[d] = 0;
        }
    }
    return LMC_TF_OK;
}

void lmc_tf_strided_copy(const void *x, int64_t offset, const int32_t *strides, void *y, const int32_t *shape,
                         int rank, int32_t elem_size)
{
    int32_t idx[LMC_TF_MAX_RANK] = {0};
    int64_t offs[1];
    const int32_t *str[1];
    const uint8_t *src = (const uint8_t *)x;
    uint8_t *dst = (uint8_t *)y;
    int32_t inner = rank > 0 ? shape[rank - 1] : 1, step = rank > 0 ? strides[rank - 1] : 0, j;
    offs[0] = offset;
    str[0] = strides;
    if (lmc_tf_count(shape, rank) == 0) return;
    do {
        int64_t p = offs[0];
        if (step == 1) {
            memcpy(dst, src + p * elem_size, (size_t)inner * (size_t)elem_size);
            dst += (int64_t)inner * elem_size;
        } else if (elem_size == 4) {
            for (j = 0; j < inner; ++j, p += step, dst += 4) memcpy(dst, src + p * 4, 4);
        } else {
            for (j = 0; j < inner; ++j, p += step, dst += elem_size)
                memcpy(dst, src + p * elem_size, (size_t)elem_size);
        }
    } while (lmc_tf_next(idx, shape, rank, str, offs, 1));
}

void lmc_tf_concat_part(const void *x, void *y, int32_t outer, int32_t x_inner, int32_t y_inner, int32_t y_offset)
{
    const uint8_t *src = (const uint8_t *)x;
    uint8_t *dst = (uint8_t *)y + y_offset;
    int32_t o;
    if (x_inner == 0) return;
    for (o = 0; o < outer; ++o) memmove(dst + (int64_t)o * y_inner, src + (int64_t)o * x_inner, (size_t)x_inner);
}

void lmc_tf_split_part(const void *x, void *y, int32_t outer, int32_t x_inner, int32_t x_offset, int32_t y_inner)
{
    const uint8_t *src = (const uint8_t *)x + x_offset;
    uint8_t *dst = (uint8_t *)y;
    int32_t o;
    if (y_inner == 0) return;
    for (o = 0; o < outer; ++o) memmove(dst + (int64_t)o * y_inner, src + (int64_t)o * x_inner, (size_t)y_inner);
}

void lmc_tf_copy(const void *x, void *y, int32_t bytes)
{
    if (x != y && bytes > 0) memmove(y, x, (size_t)bytes);
}

/* The sum of r contiguous floats in the order onnxruntime's ReduceSum/ReduceMean add them on a row that
 * starts 16-byte aligned (Eigen's vectorised reduction, 4 lanes): two 4-lane accumulators over blocks of 8,
 * joined, one more block of 4 if left, then lanes (0 + 2) + (1 + 3). r must be a multiple of 4. */
static float lmc_tf_sum_lanes(const float *p, int32_t r)
{
    float a[4], b[4];
    int32_t i, l;
    const int32_t pairs = r / 8 * 8;
    for (l = 0; l < 4; ++l) a[l] = p[l];
    if (r > 4) {
        for (l = 0; l < 4; ++l) b[l] = p[4 + l];
        for (i = 8; i < pairs; i += 8)
            for (l = 0; l < 4; ++l) {
                a[l] += p[i + l];
                b[l] += p[i + 4 + l];
            }
        for (l = 0; l < 4; ++l) a[l] += b[l];
        if (r > pairs)
            for (l = 0; l < 4; ++l) a[l] += p[pairs + l];
    }
    return (a[0] + a[2]) + (a[1] + a[3]);
}

void lmc_tf_reduce_f32(int op, const float *x, float *y, int32_t outer, int32_t r, int32_t inner)
{
    int32_t o, i, j;
    if (op != LMC_TF_REDUCE_MAX && inner == 1 && r >= 4 && r % 4 == 0) {
        for (o = 0; o < outer; ++o) {
            float acc = lmc_tf_sum_lanes(x + (int64_t)o * r, r);
            if (op == LMC_TF_REDUCE_MEAN) acc /= (float)r;
            y[o] = acc;
        }
        return;
    }
    for (o = 0; o < outer; ++o) {
        for (j = 0; j < inner; ++j) {
            const float *p = x + (int64_t)o * r * inner + j;
            float acc = op == LMC_TF_REDUCE_MAX ? -INFINITY : 0.0f;
            for (i = 0; i < r; ++i) {
                float v = p[(int64_t)i * inner];
                if (op == LMC_TF_REDUCE_MAX) acc = v > acc ? v : acc;
                else acc += v;
            }
            if (op == LMC_TF_REDUCE_MEAN) acc /= (float)r;
            y[(int64_t)o * inner + j] = acc;
        }
    }
}

void lmc_tf_reduce_sum_i64(const int64_t *x, int64_t *y, int32_t outer, int32_t r, int32_t inner)
{
    int32_t o, i, j;
    for (o = 0; o < outer; ++o) {
        for (j = 0; j < inner; ++j) {
            int64_t acc = 0;
            for (i = 0; i < r; ++i) acc += x[((int64_t)o * r + i) * inner + j];
            y[(int64_t)o * inner + j] = acc;
        }
    }
}

void lmc_tf_layer_norm_f32(const float *x, const float *scale, const float *bias, float *y, int32_t outer,
                           int32_t n, float eps)
{
    int32_t o, i;
    for (o = 0; o < outer; ++o) {
        const float *p = x + (int64_t)o * n;
        float *q = y + (int64_t)o * n;
        float mean = 0.0f, square = 0.0f, d;
        for (i = 0; i < n; ++i) {
            mean += p[i];
            square += p[i] * p[i];
        }
        mean /= (float)n;
        d = sqrtf(square / (float)n - mean * mean + eps);
        for (i = 0; i < n; ++i) q[i] = bias ? (p[i] - mean) / d * scale[i] + bias[i] : (p[i] - mean) / d * scale[i];
    }
}

void lmc_tf_softmax_f32(const float *x, float *y, int32_t outer, int32_t n, int32_t inner)
{
    int32_t o, i, j;
    for (o = 0; o < outer; ++o) {
        for (j = 0; j < inner; ++j) {
            const float *p = x + (int64_t)o * n * inner + j;
            float *q = y + (int64_t)o * n * inner + j;
            float mx = -INFINITY, sum = 0.0f;
            for (i = 0; i < n; ++i) mx = p[(int64_t)i * inner] > mx ? p[(int64_t)i * inner] : mx;
            for (i = 0; i < n; ++i) {
                float e = expf(p[(int64_t)i * inner] - mx);
                q[(int64_t)i * inner] = e;
                sum += e;
            }
            for (i = 0; i < n; ++i) q[(int64_t)i * inner] /= sum;
        }
    }
}

int lmc_tf_range_i64(const int64_t *start, const int64_t *limit, const int64_t *delta, int64_t *y, int32_t count)
{
    int64_t s = *start, l = *limit, d = *delta, n, i;
    if (d == 0) return LMC_TF_INDEX_OUT_OF_RANGE;
    n = d > 0 ? (l - s + d - 1) / d : (s - l - d - 1) / -d;
    if (n < 0) n = 0;
    if (n != count) return LMC_TF_INDEX_OUT_OF_RANGE;
    for (i = 0; i < n; ++i) y[i] = s + i * d;
    return LMC_TF_OK;
}

int lmc_tf_range_f32(const float *start, const float *limit, const float *delta, float *y, int32_t count)
{
    float s = *start, d = *delta;
    double n;
    int32_t i;
    if (d == 0.0f) return LMC_TF_INDEX_OUT_OF_RANGE;
    n = ceil(((double)*limit - (double)s) / (double)d);
    if (n < 0.0) n = 0.0;
    if ((int32_t)n != count) return LMC_TF_INDEX_OUT_OF_RANGE;
    for (i = 0; i < count; ++i) y[i] = s + (float)i * d;
    return LMC_TF_OK;
}

int lmc_tf_tensor_scatter_f32(const float *past, const float *update, const int64_t *write_idx, float *present,
                              int32_t batch, int32_t pre, int32_t slots, int32_t s, int32_t post, int circular)
{
    int32_t b, h, i;
    if (present != past) memcpy(present, past, (size_t)batch * pre * slots * post * sizeof(float));
    for (b = 0; b < batch; ++b) {
        int64_t at = write_idx ? write_idx[b] : 0;
        if (at < 0 || (!circular && at + s > slots)) return LMC_TF_INDEX_OUT_OF_RANGE;
        for (h = 0; h < pre; ++h) {
            for (i = 0; i < s; ++i) {
                int64_t row = circular ? (at + i) % slots : at + i;
                memcpy(present + (((int64_t)b * pre + h) * slots + row) * post,
                       update + (((int64_t)b * pre + h) * s + i) * post, (size_t)post * sizeof(float));
            }
        }
    }
    return LMC_TF_OK;
}

int lmc_tf_scatter_nd(const void *data, const int64_t *idx, const void *updates, void *y, const int32_t *dims,
                      int32_t k, int32_t n, int32_t slice_bytes, int32_t total_bytes)
{
    const uint8_t *src = (const uint8_t *)updates;
    uint8_t *dst = (uint8_t *)y;
    int32_t i, j;
    if (y != data) memcpy(y, data, (size_t)total_bytes);
    for (i = 0; i < n; ++i) {
        int64_t at = 0;
        for (j = 0; j < k; ++j) {
            int64_t v = idx[(int64_t)i * k + j];
            if (v < 0) v += dims[j];
            if (v < 0 || v >= dims[j]) return LMC_TF_INDEX_OUT_OF_RANGE;
            at = at * dims[j] + v;
        }
        memcpy(dst + at * slice_bytes, src + (int64_t)i * slice_bytes, (size_t)slice_bytes);
    }
    return LMC_TF_OK;
}

int lmc_tf_scatter_nd_add_f32(const float *data, const int64_t *idx, const float *updates, float *y,
                              const int32_t *dims, int32_t k, int32_t n, int32_t slice, int32_t total)
{
    int32_t i, j, c;
    if (y != data) memcpy(y, data, (size_t)total * sizeof(float));
    for (i = 0; i < n; ++i) {
        int64_t at = 0;
        for (j = 0; j < k; ++j) {
            int64_t v = idx[(int64_t)i * k + j];
            if (v < 0) v += dims[j];
            if (v < 0 || v >= dims[j]) return LMC_TF_INDEX_OUT_OF_RANGE;
            at = at * dims[j] + v;
        }
        for (c = 0; c < slice; ++c) y[at * slice + c] += updates[(int64_t)i * slice + c];
    }
    return LMC_TF_OK;
}

void lmc_tf_onehot(const int64_t *idx, const void *values, void *y, int32_t outer, int32_t depth, int32_t inner,
                   int32_t elem_size)
{
    const uint8_t *off = (const uint8_t *)values, *on = off + elem_size;
    uint8_t *dst = (uint8_t *)y;
    int32_t o, d, c;
    for (o = 0; o < outer; ++o) {
        for (d = 0; d < depth; ++d) {
            for (c = 0; c < inner; ++c) {
                int64_t v = idx[(int64_t)o * inner + c];
                if (v < 0) v += depth;
                memcpy(dst + (((int64_t)o * depth + d) * inner + c) * elem_size, v == d ? on : off,
                       (size_t)elem_size);
            }
        }
    }
}

int lmc_tf_gather_nd(const void *data, const int64_t *idx, void *y, const int32_t *dims, int32_t k, int32_t n,
                     int32_t slice_bytes)
{
    const uint8_t *src = (const uint8_t *)data;
    uint8_t *dst = (uint8_t *)y;
    int32_t i, j;
    for (i = 0; i < n; ++i) {
        int64_t at = 0;
        for (j = 0; j < k; ++j) {
            int64_t v = idx[(int64_t)i * k + j];
            if (v < 0) v += dims[j];
            if (v < 0 || v >= dims[j]) return LMC_TF_INDEX_OUT_OF_RANGE;
            at = at * dims[j] + v;
        }
        memcpy(dst + (int64_t)i * slice_bytes, src + at * slice_bytes, (size_t)slice_bytes);
    }
    return LMC_TF_OK;
}

int lmc_tf_scatter_elements(const void *data, const int64_t *idx, const void *updates, void *y,
                            const int32_t *dstrides, const int32_t *shape, int rank, int axis, int32_t axis_dim,
                            int32_t elem_size, int32_t total_bytes)
{
    int32_t at[LMC_TF_MAX_RANK] = {0};
    int32_t total = lmc_tf_count(shape, rank), i;
    int d;
    const uint8_t *src = (const uint8_t *)updates;
    uint8_t *dst = (uint8_t *)y;
    if (y != data) memcpy(y, data, (size_t)total_bytes);
    for (i = 0; i < total; ++i) {
        int64_t off = 0, v = idx[i];
        if (v < 0) v += axis_dim;
        if (v < 0 || v >= axis_dim) return LMC_TF_INDEX_OUT_OF_RANGE;
        for (d = 0; d < rank; ++d) off += (int64_t)(d == axis ? v : at[d]) * dstrides[d];
        memcpy(dst + off * elem_size, src + (int64_t)i * elem_size, (size_t)elem_size);
        for (d = rank - 1; d >= 0; --d) {
            if (++at[d] < shape[d]) break;
            at[d] = 0;
        }
    }
    return LMC_TF_OK;
}

/* 1 when (v, i) comes before (w, j) in TopK's order: larger (smaller) values first, then lower indices. */
static int lmc_tf_before(float v, int32_t i, float w, int32_t j, int largest)
{
    if (v != w) return largest ? v > w : v < w;
    return i < j;
}

void lmc_tf_topk_f32(const float *x, float *values, int64_t *indices, int32_t outer, int32_t n, int32_t inner,
                     int32_t k, int largest)
{
    int32_t o, c, r, i;
    for (o = 0; o < outer; ++o) {
        for (c = 0; c < inner; ++c) {
            const float *p = x + (int64_t)o * n * inner + c;
            float pv = 0.0f;
            int32_t pi = -1;
            for (r = 0; r < k; ++r) {             /* the next element after (pv, pi) in the order */
                int32_t best = -1;
                for (i = 0; i < n; ++i) {
                    float v = p[(int64_t)i * inner];
                    if (pi >= 0 && !lmc_tf_before(pv, pi, v, i, largest)) continue;
                    if (best < 0 || lmc_tf_before(v, i, p[(int64_t)best * inner], best, largest)) best = i;
                }
                pv = p[(int64_t)best * inner];
                pi = best;
                values[((int64_t)o * k + r) * inner + c] = pv;
                indices[((int64_t)o * k + r) * inner + c] = best;
            }
        }
    }
}

void lmc_tf_argmax_f32(const float *x, int64_t *y, int32_t outer, int32_t n, int32_t inner, int select_last)
{
    int32_t o, c, i;
    for (o = 0; o < outer; ++o) {
        for (c = 0; c < inner; ++c) {
            const float *p = x + (int64_t)o * n * inner + c;
            int32_t best = 0;
            for (i = 1; i < n; ++i) {
                float v = p[(int64_t)i * inner], b = p[(int64_t)best * inner];
                if (v > b || (select_last && v == b)) best = i;
            }
            y[(int64_t)o * inner + c] = best;
        }
    }
}

#define LMC_TF_CUMSUM(T, x, y, outer, n, inner, exclusive, reverse)                         \
    do {                                                                                    \
        int32_t o_, c_, i_;                                                                 \
        for (o_ = 0; o_ < (outer); ++o_) {                                                  \
            for (c_ = 0; c_ < (inner); ++c_) {                                              \
                T acc_ = 0;                                                                 \
                for (i_ = 0; i_ < (n); ++i_) {                                              \
                    int32_t r_ = (reverse) ? (n) - 1 - i_ : i_;                             \
                    int64_t at_ = ((int64_t)o_ * (n) + r_) * (inner) + c_;                  \
                    T v_ = (x)[at_];                                                        \
                    if (exclusive) {                                                        \
                        (y)[at_] = acc_;                                                    \
                        acc_ += v_;                                                         \
                    } else {                                                                \
                        acc_ += v_;                                                         \
                        (y)[at_] = acc_;                                                    \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    } while (0)

void lmc_tf_cumsum_f32(const float *x, float *y, int32_t outer, int32_t n, int32_t inner, int exclusive, int reverse)
{
    LMC_TF_CUMSUM(float, x, y, outer, n, inner, exclusive, reverse);
}

void lmc_tf_cumsum_i64(const int64_t *x, int64_t *y, int32_t outer, int32_t n, int32_t inner, int exclusive,
                       int reverse)
{
    LMC_TF_CUMSUM(int64_t, x, y, outer, n, inner, exclusive, reverse);
}

/* The scaled score of key j for query row qi, or -INFINITY when the key is hidden. */
static float lmc_tf_score(const float *qi, const float *kj, int32_t d, float scale, int hidden, const float *madd)
{
    float sc = 0.0f;
    int32_t c;
    if (hidden) return -INFINITY;
    for (c = 0; c < d; ++c) sc += qi[c] * kj[c];
    sc *= scale;
    if (madd) sc += *madd;
    return sc;
}

int lmc_tf_attention_f32(const float *q, const float *k, const float *v, const uint8_t *mask_bool,
                         const float *mask_f32, const int32_t *mask_strides, const int64_t *nonpad, float *y,
                         int32_t batch, int32_t hq, int32_t hkv, int32_t s, int32_t t, int32_t d, int32_t dv,
                         float scale, int is_causal)
{
    int32_t b, h, i, j, c;
    if (hkv <= 0 || hq % hkv != 0) return LMC_TF_INDEX_OUT_OF_RANGE;
    for (b = 0; b < batch; ++b) {
        int64_t visible_end = nonpad ? nonpad[b] : t;
        if (visible_end > t) visible_end = t;
        for (h = 0; h < hq; ++h) {
            int32_t g = h / (hq / hkv);
            const float *kb = k + ((int64_t)b * hkv + g) * t * d;
            const float *vb = v + ((int64_t)b * hkv + g) * t * dv;
            for (i = 0; i < s; ++i) {
                const float *qi = q + (((int64_t)b * hq + h) * s + i) * d;
                float *yi = y + (((int64_t)b * hq + h) * s + i) * dv;
                int64_t mrow = mask_strides ? (int64_t)b * mask_strides[0] + (int64_t)h * mask_strides[1]
                                              + (int64_t)i * mask_strides[2] : 0;
                float mx = -INFINITY, sum = 0.0f;
                for (c = 0; c < dv; ++c) yi[c] = 0.0f;
                for (j = 0; j < t; ++j) {           /* pass 1: the largest visible score */
                    int64_t at = mrow + (int64_t)j * (mask_strides ? mask_strides[3] : 0);
                    int hidden = j >= visible_end || (is_causal && j > i) || (mask_bool && !mask_bool[at]);
                    float sc = lmc_tf_score(qi, kb + (int64_t)j * d, d, scale, hidden, mask_f32 ? mask_f32 + at : 0);
                    if (sc > mx) mx = sc;
                }
                if (mx == -INFINITY) continue;      /* no visible key: 0 */
                for (j = 0; j < t; ++j) {           /* pass 2: exp, sum and the weighted values */
                    int64_t at = mrow + (int64_t)j * (mask_strides ? mask_strides[3] : 0);
                    int hidden = j >= visible_end || (is_causal && j > i) || (mask_bool && !mask_bool[at]);
                    float sc = lmc_tf_score(qi, kb + (int64_t)j * d, d, scale, hidden, mask_f32 ? mask_f32 + at : 0);
                    float e;
                    if (sc == -INFINITY) continue;
                    e = expf(sc - mx);
                    sum += e;
                    for (c = 0; c < dv; ++c) yi[c] += e * vb[(int64_t)j * dv + c];
                }
                for (c = 0; c < dv; ++c) yi[c] /= sum;
            }
        }
    }
    return LMC_TF_OK;
}
