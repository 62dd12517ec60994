/* lmc portable C99 kernels: what every kernel family shares.
 *
 * Tensors are dense, row-major, in the layouts ONNX gives them (NCHW for convolutions). A kernel never
 * allocates; buffers are the caller's (the arena, the weights in flash, the I/O). Kernels that the plan may
 * run in place (output over a dying input of the same shape) read element i before writing element i, and
 * take no `restrict` on such pairs.
 *
 * Each family has its own header and source (lmc_kernels_<family>.h/.c); model.c includes the headers of
 * the families it calls, and the bundle carries only their sources.
 */
#ifndef LMC_KERNELS_H
#define LMC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define LMC_MAX_DIMS 8

/* Broadcasting of up to LMC_MAX_DIMS dims: output dims and each operand's element strides (0 where the
 * operand is broadcast along that dim). Built by the emitter with the dims collapsed where possible. */
typedef struct {
    int32_t ndim;
    int32_t dims[LMC_MAX_DIMS];
    int32_t sa[LMC_MAX_DIMS];
    int32_t sb[LMC_MAX_DIMS];
} lmc_bcast;

/* An activation applied in an epilogue (FusedConv, Gemm + Relu …). */
typedef enum { LMC_ACT_NONE = 0, LMC_ACT_RELU = 1, LMC_ACT_CLIP = 2, LMC_ACT_SIGMOID = 3, LMC_ACT_TANH = 4,
               LMC_ACT_LEAKY_RELU = 5, LMC_ACT_HARD_SIGMOID = 6 } lmc_act_kind;

typedef struct {
    lmc_act_kind kind;
    float a, b;                 /* CLIP: min, max; LEAKY_RELU: alpha; HARD_SIGMOID: alpha, beta */
} lmc_act;

/* The logistic function as onnxruntime computes it on the host (MLAS's rational approximation in fused
 * multiply-adds, x clamped to [-18, 18]): Sigmoid, and activations fused into convolutions. */
float lmc_logistic(float x);

float lmc_apply_act(float v, const lmc_act *act);

/* Plain byte copy (Reshape, Flatten, Squeeze, Unsqueeze, Identity when not planned in place); nothing
 * when dst == src. */
void lmc_copy(void *dst, const void *src, size_t bytes);

/* outer blocks of block_bytes each, from src (contiguous) to dst with dst_stride_bytes between blocks
 * (Concat: one call per input). */
void lmc_copy_blocks(void *dst, const void *src, int32_t outer, size_t block_bytes, size_t dst_stride_bytes);

/* y[i] = x[sum_d idx_d * g->sa[d]] over the output index space g->dims (elements of elem_bytes each):
 * Transpose, and any strided view copy. */
void lmc_gather_strided(void *y, const void *x, size_t elem_bytes, const lmc_bcast *g);

#endif /* LMC_KERNELS_H */
