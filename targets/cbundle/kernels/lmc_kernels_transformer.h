/* lmc C bundle: the transformer kernels (float32; int64 / bool where index and mask arithmetic needs them).
 *
 * Conventions (all shapes static, computed by the emitter from the compiled graph):
 * - tensors are dense row-major; bool is one byte (0 or 1); int64 is little-endian two's complement;
 * - an N-d operand read under broadcasting is given by its element strides along the *output's* dims
 *   (0 where it is broadcast), so one loop serves every broadcast pattern; rank <= LMC_TF_MAX_RANK;
 * - byte-generic data movement (gather, strided copy, concat, split, where) takes the element size;
 * - kernels that can meet bad run-time data (an index out of range) return nonzero, which lmc_run returns.
 * No allocation, no static state; only libm's sqrtf, expf, powf, sinf, cosf, tanhf, fabsf. */
#ifndef LMC_KERNELS_TRANSFORMER_H
#define LMC_KERNELS_TRANSFORMER_H

#include "lmc_kernels.h"

#define LMC_TF_MAX_RANK LMC_MAX_DIMS

/* Return codes of the kernels that check run-time data. */
#define LMC_TF_OK 0
#define LMC_TF_INDEX_OUT_OF_RANGE 3

/* Binary elementwise operations. */
enum lmc_tf_binary {
    LMC_TF_ADD = 0, LMC_TF_SUB = 1, LMC_TF_MUL = 2, LMC_TF_DIV = 3, LMC_TF_POW = 4, LMC_TF_MAX = 5, LMC_TF_MIN = 6,
    LMC_TF_MOD = 7          /* int64: the sign of the divisor (ONNX Mod, fmod 0); float: fmodf (fmod 1) */
};
/* Comparisons (bool result). */
enum lmc_tf_compare {
    LMC_TF_EQUAL = 0, LMC_TF_LESS = 1, LMC_TF_LESS_OR_EQUAL = 2, LMC_TF_GREATER = 3, LMC_TF_GREATER_OR_EQUAL = 4
};
/* Logical operations on bool. */
enum lmc_tf_logical { LMC_TF_AND = 0, LMC_TF_OR = 1, LMC_TF_XOR = 2 };
/* Unary float operations. */
enum lmc_tf_unary {
    LMC_TF_NEG = 0, LMC_TF_SQRT = 1, LMC_TF_SIGMOID = 2, LMC_TF_COS = 3, LMC_TF_SIN = 4, LMC_TF_EXP = 5,
    LMC_TF_RECIPROCAL = 6, LMC_TF_ABS = 7, LMC_TF_TANH = 8, LMC_TF_RELU = 9, LMC_TF_SILU = 10, LMC_TF_IDENTITY = 11
};
/* Reductions. */
enum lmc_tf_reduce { LMC_TF_REDUCE_SUM = 0, LMC_TF_REDUCE_MEAN = 1, LMC_TF_REDUCE_MAX = 2 };
/* Element types: ONNX TensorProto codes. */
enum lmc_tf_dtype {
    LMC_TF_FLOAT = 1, LMC_TF_UINT8 = 2, LMC_TF_INT8 = 3, LMC_TF_INT32 = 6, LMC_TF_INT64 = 7, LMC_TF_BOOL = 9
};

/* y[i] = a[i] op b[i] over shape[rank] with broadcast strides sa, sb. */
void lmc_tf_binary_f32(int op, const float *a, const int32_t *sa, const float *b, const int32_t *sb, float *y,
                       const int32_t *shape, int rank);
void lmc_tf_binary_i64(int op, const int64_t *a, const int32_t *sa, const int64_t *b, const int32_t *sb, int64_t *y,
                       const int32_t *shape, int rank);
void lmc_tf_compare_f32(int op, const float *a, const int32_t *sa, const float *b, const int32_t *sb, uint8_t *y,
                        const int32_t *shape, int rank);
void lmc_tf_compare_i64(int op, const int64_t *a, const int32_t *sa, const int64_t *b, const int32_t *sb,
                        uint8_t *y, const int32_t *shape, int rank);
void lmc_tf_logical(int op, const uint8_t *a, const int32_t *sa, const uint8_t *b, const int32_t *sb, uint8_t *y,
                    const int32_t *shape, int rank);
/* y = cond ? x : z (x, z of elem_size bytes). */
void lmc_tf_where(const uint8_t *cond, const int32_t *sc, const void *x, const int32_t *sx, const void *z,
                  const int32_t *sz, void *y, const int32_t *shape, int rank, int32_t elem_size);

void lmc_tf_unary_f32(int op, const float *x, float *y, int32_t n);
void lmc_tf_neg_i64(const int64_t *x, int64_t *y, int32_t n);
void lmc_tf_not(const uint8_t *x, uint8_t *y, int32_t n);
void lmc_tf_isnan_f32(const float *x, uint8_t *y, int32_t n);
/* Cast between the lmc_tf_dtype types (float -> integer truncates toward zero; -> bool is x != 0). */
void lmc_tf_cast(const void *x, int from, void *y, int to, int32_t n);

/* y[batch] = a[batch] (m x k) @ b[batch] (k x n); the batch dims bshape[brank] index a and b through the
 * element strides sa, sb (0 where broadcast; a 2-D weight has all 0); y is dense [batch..., m, n]. */
void lmc_tf_matmul_f32(const float *a, const int32_t *sa, const float *b, const int32_t *sb, float *y,
                       const int32_t *bshape, int brank, int32_t m, int32_t k, int32_t n);

/* Gather along an axis: data is [outer, axis_dim, inner] (inner in bytes), y is [outer, nidx, inner].
 * Negative indices count from the end; an index outside [-axis_dim, axis_dim) returns
 * LMC_TF_INDEX_OUT_OF_RANGE and leaves y partly written. */
int lmc_tf_gather_i64(const void *data, const int64_t *idx, void *y, int32_t outer, int32_t axis_dim,
                      int32_t inner_bytes, int32_t nidx);
int lmc_tf_gather_i32(const void *data, const int32_t *idx, void *y, int32_t outer, int32_t axis_dim,
                      int32_t inner_bytes, int32_t nidx);

/* GatherElements: y (dense, shape[rank] = the indices' shape) [i] = data[i with dim axis replaced by idx[i]],
 * data read through its element strides dstrides[rank]; negative indices count from axis_dim. An index out of
 * range returns LMC_TF_INDEX_OUT_OF_RANGE. */
int lmc_tf_gather_elements(const void *data, const int32_t *dstrides, const int64_t *idx, void *y,
                           const int32_t *shape, int rank, int axis, int32_t axis_dim, int32_t elem_size);

/* y (dense, shape[rank]) [i] = x[offset + sum_d i_d * strides[d]] (element units; strides may be 0 or
 * negative): Transpose, Slice, Expand, Tile-free broadcasting copies. */
void lmc_tf_strided_copy(const void *x, int64_t offset, const int32_t *strides, void *y, const int32_t *shape,
                         int rank, int32_t elem_size);
/* Copy x [outer, x_inner] (bytes) into y [outer, y_inner] at byte y_offset of each row: one Concat input.
 * Split is the reverse: y [outer, y_inner] from x [outer, x_inner] at byte x_offset. */
void lmc_tf_concat_part(const void *x, void *y, int32_t outer, int32_t x_inner, int32_t y_inner, int32_t y_offset);
void lmc_tf_split_part(const void *x, void *y, int32_t outer, int32_t x_inner, int32_t x_offset, int32_t y_inner);
/* Reshape/Flatten/Squeeze/Unsqueeze/Identity when the output has its own buffer (memmove: may overlap). */
void lmc_tf_copy(const void *x, void *y, int32_t bytes);

/* Reduce x [outer, r, inner] over r: y [outer, inner]. */
void lmc_tf_reduce_f32(int op, const float *x, float *y, int32_t outer, int32_t r, int32_t inner);
void lmc_tf_reduce_sum_i64(const int64_t *x, int64_t *y, int32_t outer, int32_t r, int32_t inner);
/* LayerNormalization over the last n elements of each of outer rows, as onnxruntime computes it:
 * mean = sum x / n, d = sqrt(sum x^2 / n - mean^2 + eps), y = (x - mean) / d * scale (+ bias; NULL: none). */
void lmc_tf_layer_norm_f32(const float *x, const float *scale, const float *bias, float *y, int32_t outer,
                           int32_t n, float eps);
/* Softmax of x [outer, n, inner] over n (max-subtracted, float32 accumulation). */
void lmc_tf_softmax_f32(const float *x, float *y, int32_t outer, int32_t n, int32_t inner);
/* Range: y[i] = start + i * delta for i < n, where n = max(ceil((limit - start) / delta), 0) must equal the
 * planned count (else LMC_TF_INDEX_OUT_OF_RANGE: the static shape does not hold). */
int lmc_tf_range_i64(const int64_t *start, const int64_t *limit, const int64_t *delta, int64_t *y, int32_t count);
int lmc_tf_range_f32(const float *start, const float *limit, const float *delta, float *y, int32_t count);

/* TensorScatter (opset 24, mode linear) with the cache axis 2 of [B, H, N, D] — cache as
 * [batch, pre, slots, post] (pre = H, post = D in elements): present = past with update [batch, pre, s, post]
 * written at rows write_idx[b] .. write_idx[b] + s - 1 (row 0 without write_idx). present may alias past
 * (the in-place state): the copy is then skipped. A write past the end returns LMC_TF_INDEX_OUT_OF_RANGE. */
int lmc_tf_tensor_scatter_f32(const float *past, const float *update, const int64_t *write_idx, float *present,
                              int32_t batch, int32_t pre, int32_t slots, int32_t s, int32_t post, int circular);

/* ScatterND (reduction none): y = data with, for each of n index tuples of k int64 entries (negative counting
 * from the end of its dim dims[j]), the slice of slice_bytes at that tuple replaced by the next slice of
 * updates. y may alias data (then not copied). An index out of range returns LMC_TF_INDEX_OUT_OF_RANGE. */
int lmc_tf_scatter_nd(const void *data, const int64_t *idx, const void *updates, void *y, const int32_t *dims,
                      int32_t k, int32_t n, int32_t slice_bytes, int32_t total_bytes);

/* ScatterND with reduction add (float32): the slices of updates are added in order instead of written. */
int lmc_tf_scatter_nd_add_f32(const float *data, const int64_t *idx, const float *updates, float *y,
                              const int32_t *dims, int32_t k, int32_t n, int32_t slice, int32_t total);
/* OneHot: y [outer, depth, inner] = values[1] where idx [outer, inner] (negative: from depth) is the row, else
 * values[0] (an index outside [-depth, depth) gives a row of values[0]). */
void lmc_tf_onehot(const int64_t *idx, const void *values, void *y, int32_t outer, int32_t depth, int32_t inner,
                   int32_t elem_size);
/* GatherND (batch_dims 0): for each of n index tuples of k int64 entries, the slice of slice_bytes of data at
 * that tuple, in order, into y. An index out of range returns LMC_TF_INDEX_OUT_OF_RANGE. */
int lmc_tf_gather_nd(const void *data, const int64_t *idx, void *y, const int32_t *dims, int32_t k, int32_t n,
                     int32_t slice_bytes);
/* ScatterElements (reduction none): y = data with y[i with dim axis replaced by idx[i]] = updates[i] for every
 * i of the indices' shape[rank]; dstrides are y's element strides. y may alias data (then not copied). */
int lmc_tf_scatter_elements(const void *data, const int64_t *idx, const void *updates, void *y,
                            const int32_t *dstrides, const int32_t *shape, int rank, int axis, int32_t axis_dim,
                            int32_t elem_size, int32_t total_bytes);
/* TopK of x [outer, n, inner] over n: values and int64 indices [outer, k, inner], sorted (largest first when
 * largest, else smallest first); equal values in index order, as onnxruntime orders them. */
void lmc_tf_topk_f32(const float *x, float *values, int64_t *indices, int32_t outer, int32_t n, int32_t inner,
                     int32_t k, int largest);
/* ArgMax of x [outer, n, inner] over n: int64 [outer, inner]; the first (or, select_last, the last) maximum. */
void lmc_tf_argmax_f32(const float *x, int64_t *y, int32_t outer, int32_t n, int32_t inner, int select_last);
/* CumSum of x [outer, n, inner] over n (exclusive: the sum before; reverse: from the end). */
void lmc_tf_cumsum_f32(const float *x, float *y, int32_t outer, int32_t n, int32_t inner, int exclusive,
                       int reverse);
void lmc_tf_cumsum_i64(const int64_t *x, int64_t *y, int32_t outer, int32_t n, int32_t inner, int exclusive,
                       int reverse);

/* Attention (opset 23/24, 4-D): q [B, Hq, S, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Hq a multiple of
 * Hkv: query head h reads kv head h / (Hq / Hkv)); y [B, Hq, S, Dv].
 * scores = scale * q k^T, then masked: key t of row (b, h, i) is hidden when mask_bool (strides over
 * [B, Hq, S, T], NULL for none) is 0, or is_causal and t > i (aligned top-left, as ONNX without a past), or
 * nonpad (NULL for none) and t >= nonpad[b]; mask_f32 (same strides) is added instead when given. softmax
 * over the visible keys (a row with none gives 0). Two passes over the keys (max, then exp-sum and the
 * weighted values accumulated in y): no scratch memory. */
int lmc_tf_attention_f32(const float *q, const float *k, const float *v, const uint8_t *mask_bool,
                         const float *mask_f32, const int32_t *mask_strides, const int64_t *nonpad, float *y,
                         int32_t batch, int32_t hq, int32_t hkv, int32_t s, int32_t t, int32_t d, int32_t dv,
                         float scale, int is_causal);

#endif /* LMC_KERNELS_TRANSFORMER_H */
