/* lmc kernels, family "int8": integer operators on int8 activations (QLinearConv, QGemm, QLinearAdd,
 * QLinearGlobalAveragePool, int8 MaxPool), requantized as onnxruntime does on the host:
 *     q = saturate(round_half_even(clamp((float)acc * scale, qmin - zp, qmax - zp)) + zp)
 * with acc the exact int32 sum and scale a float32 computed by the emitter in onnxruntime's order. */
#ifndef LMC_KERNELS_INT8_H
#define LMC_KERNELS_INT8_H
#include "lmc_kernels.h"
#include "lmc_kernels_cnn.h"

int8_t lmc_requantize_s8(int32_t acc, float scale, int32_t zero);

/* QLinearConv, NCHW, weights [c_out, c_in / group, kh, kw] int8 with zero point w_zero[c] (NULL: 0),
 * bias int32 (NULL: none), scale[c] = x_scale · w_scale[c] / y_scale. */
typedef struct {
    lmc_conv2d_params g;          /* geometry (its act is unused) */
    int32_t x_zero, y_zero;
} lmc_qconv_params;

void lmc_qlinear_conv_s8(const int8_t *x, const int8_t *w, const int8_t *w_zero, const int32_t *bias,
                         const float *scale, int8_t *y, const lmc_qconv_params *p);

/* QGemm: acc[i][j] = Σ_t (a[i][t] − a_zero) · (b[t][j] − b_zero[j]) + bias[j] with b [k, n], or [n, k] when
 * trans_b; y float (y_f32: acc · scale[j]) or int8 (y_s8: requantized with scale[j] and y_zero). */
typedef struct {
    int32_t m, n, k, trans_b, a_zero, y_zero;
} lmc_qgemm_params;

void lmc_qgemm_s8(const int8_t *a, const int8_t *b, const int8_t *b_zero, const int32_t *bias, const float *scale,
                  float *y_f32, int8_t *y_s8, const lmc_qgemm_params *p);

/* QLinearAdd, same shapes: y = requant((a − za) · ra + (b − zb) · rb) with ra = sa / sy, rb = sb / sy. */
void lmc_qlinear_add_s8(const int8_t *a, int32_t a_zero, float ra, const int8_t *b, int32_t b_zero, float rb,
                        int8_t *y, int32_t y_zero, int32_t n);

/* QLinearGlobalAveragePool (NCHW): y[i] = requant(Σ (x − x_zero) over hw, scale) with
 * scale = x_scale / (y_scale · hw). */
void lmc_qglobal_avgpool_s8(const int8_t *x, int32_t x_zero, float scale, int8_t *y, int32_t y_zero,
                            int32_t nc, int32_t hw);

/* QLinearMul, same shapes: y = requant((a − za)(b − zb), ratio) with ratio = (sa · sb) / sy. */
void lmc_qlinear_mul_s8(const int8_t *a, int32_t a_zero, const int8_t *b, int32_t b_zero, float ratio,
                        int8_t *y, int32_t y_zero, int32_t n);

/* A unary operator on int8 codes as a table: y[i] = table[x[i] + 128]. */
void lmc_lookup_s8(const int8_t *x, const int8_t *table, int8_t *y, int32_t n);

/* MaxPool on int8 codes (the code order is the value order). */
void lmc_maxpool2d_s8(const int8_t *x, int8_t *y, const lmc_pool2d_params *p);

#endif /* LMC_KERNELS_INT8_H */
