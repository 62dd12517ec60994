/* lmc kernels, family "quant": QuantizeLinear / DequantizeLinear and float products with int8 weights.
 * Rounding as onnxruntime: v / scale rounded half to even (nearbyintf in the default rounding mode),
 * plus the zero point, saturated to the type's range. */
#ifndef LMC_KERNELS_QUANT_H
#define LMC_KERNELS_QUANT_H
#include "lmc_kernels.h"
#include "lmc_kernels_cnn.h"

/* x viewed as [outer, axis_len, inner]; scale/zero point per axis index (axis_len = 1: per tensor).
 * zp NULL: zero. Block quantization is not supported. */
typedef struct {
    int32_t outer, axis_len, inner;
} lmc_qaxis;

void lmc_dequantize_s8(const int8_t *x, const float *scale, const int8_t *zp, float *y, const lmc_qaxis *q);
void lmc_dequantize_u8(const uint8_t *x, const float *scale, const uint8_t *zp, float *y, const lmc_qaxis *q);
void lmc_dequantize_s32(const int32_t *x, const float *scale, const int32_t *zp, float *y, const lmc_qaxis *q);
void lmc_quantize_s8(const float *x, const float *scale, const int8_t *zp, int8_t *y, const lmc_qaxis *q);
void lmc_quantize_u8(const float *x, const float *scale, const uint8_t *zp, uint8_t *y, const lmc_qaxis *q);

/* y = A · dequant(Bq) with A [m, k] float (batch rows at a + b·m·k), Bq [k, n] int8, scale and zero point
 * per column (per_col) or per tensor; zp NULL: zero. */
void lmc_matmul_f32_w8(const float *a, const int8_t *bq, const float *scale, const int8_t *zp, float *y,
                       int32_t m, int32_t k, int32_t n, int32_t batch, int32_t per_col);

/* Gemm with B decoded on the fly: y = alpha · A · dequant(Bq) + beta · C; Bq int8 [k, n] (or [n, k] when
 * p->trans_b), scale and zero point per output column (per_col) or per tensor; p->trans_a must be 0. */
void lmc_gemm_f32_w8(const float *a, const int8_t *bq, const float *scale, const int8_t *zp, const float *c,
                     float *y, const lmc_gemm_params *p, int32_t per_col);

#endif /* LMC_KERNELS_QUANT_H */
