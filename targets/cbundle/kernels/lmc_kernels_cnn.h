/* lmc kernels, family "cnn": float32 convolution, pooling, matrix products, elementwise and softmax. */
#ifndef LMC_KERNELS_CNN_H
#define LMC_KERNELS_CNN_H
#include "lmc_kernels.h"

/* 2-D convolution, NCHW, weights [c_out, c_in / group, kh, kw] (1-D convolutions have h = kh = 1). */
typedef struct {
    int32_t n, c_in, h_in, w_in, c_out, h_out, w_out;
    int32_t kh, kw, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, group;
    lmc_act act;
} lmc_conv2d_params;

void lmc_conv2d_f32(const float *x, const float *w, const float *bias, float *y, const lmc_conv2d_params *p);

/* Pooling, NCHW. The window [start, start + k·dil) is clipped to the input; AveragePool divides by the
 * window clipped to input + pads when count_include_pad, else by the elements inside the input. */
typedef struct {
    int32_t n, c, h_in, w_in, h_out, w_out;
    int32_t kh, kw, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w;
    int32_t count_include_pad;
} lmc_pool2d_params;

void lmc_maxpool2d_f32(const float *x, float *y, const lmc_pool2d_params *p);
void lmc_avgpool2d_f32(const float *x, float *y, const lmc_pool2d_params *p);
/* y[i] = mean (or max) of x[i·hw … i·hw + hw) for i < nc. */
void lmc_global_avgpool_f32(const float *x, float *y, int32_t nc, int32_t hw);
void lmc_global_maxpool_f32(const float *x, float *y, int32_t nc, int32_t hw);

/* y[b] = A[b] · B[b] with A [m, k], B [k, n] row-major; batch b reads A at a_off[b] and B at b_off[b]
 * elements (NULL: 0 for every b), writes y at b·m·n. */
void lmc_matmul_f32(const float *a, const float *b, float *y, int32_t m, int32_t k, int32_t n, int32_t batch,
                    const int32_t *a_off, const int32_t *b_off);

/* Gemm: y = alpha · op(A) · op(B) + beta · C, op(A) [m, k], op(B) [k, n]; C (NULL: none) read at
 * c[i·c_rs + j·c_cs] (broadcast by zero strides); act applied last. */
typedef struct {
    int32_t m, n, k, trans_a, trans_b, c_rs, c_cs;
    float alpha, beta;
    lmc_act act;
} lmc_gemm_params;

void lmc_gemm_f32(const float *a, const float *b, const float *c, float *y, const lmc_gemm_params *p);

/* Elementwise with numpy broadcasting (strides in g); y may be a or b (in place). */
typedef enum { LMC_BIN_ADD = 0, LMC_BIN_SUB = 1, LMC_BIN_MUL = 2, LMC_BIN_DIV = 3, LMC_BIN_MAX = 4,
               LMC_BIN_MIN = 5, LMC_BIN_POW = 6 } lmc_binary_kind;

void lmc_binary_f32(lmc_binary_kind op, const float *a, const float *b, float *y, const lmc_bcast *g);

/* y[i] = act(x[i]) for i < n; y may be x. */
void lmc_activation_f32(const float *x, float *y, int32_t n, const lmc_act *act);

typedef enum { LMC_UN_EXP = 0, LMC_UN_LOG = 1, LMC_UN_SQRT = 2, LMC_UN_NEG = 3, LMC_UN_ABS = 4,
               LMC_UN_RECIPROCAL = 5, LMC_UN_ERF = 6 } lmc_unary_kind;

void lmc_unary_f32(lmc_unary_kind op, const float *x, float *y, int32_t n);

/* y[n][c][i] = x[n][c][i] · a[c] + b[c] for i < inner (BatchNormalization in inference, folded); y may be x. */
void lmc_channel_affine_f32(const float *x, const float *a, const float *b, float *y, int32_t n, int32_t c,
                            int32_t inner);

/* Softmax over the axis of length len, x viewed as [outer, len, inner]; y may be x. */
void lmc_softmax_f32(const float *x, float *y, int32_t outer, int32_t len, int32_t inner);

#endif /* LMC_KERNELS_CNN_H */
