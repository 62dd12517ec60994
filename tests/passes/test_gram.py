"""Gram sums (``passes.quantize.gram``): Σ XᵀX over rows arriving a sample at a time, on onnxruntime's GEMM
over the upper blocks (mirrored at the end) or numpy's product whole, against float64."""

from __future__ import annotations

import numpy as np
import pytest

from lmc.passes.quantize import gram


@pytest.mark.parametrize("features, rows, samples", [
    (1024, 256, 9),        # split into parts; flushed every 4 samples and once at the end
    (1024, 1500, 3),       # more rows a sample than features: a flush per sample
    (1032, 64, 5),         # split, parts of 258
    (100, 30, 7),          # under MIN_SPLIT: numpy whole
    (1026, 128, 3),        # not divisible by the parts: numpy whole
])
def test_gram_sum_is_the_float64_product(features, rows, samples):
    rng = np.random.default_rng(features + rows)
    xs = [rng.standard_normal((rows, features)).astype(np.float32) * rng.uniform(0.1, 3, features).astype(np.float32)
          for _ in range(samples)]
    products = gram.GramProducts()
    acc = gram.GramSum(rows, features, products)
    for x in xs:
        acc.add(x)
    got = acc.result()
    x = np.concatenate(xs).astype(np.float64)
    want = x.T @ x
    assert got.dtype == gram.GRAM_DTYPE and got.shape == (features, features)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)
    assert gram.GramProducts.splits(features) == (features >= gram.MIN_SPLIT and features % gram.PARTS == 0)


def test_sessions_are_shared_per_feature_count():
    products = gram.GramProducts()
    rng = np.random.default_rng(0)
    sums = [gram.GramSum(16, 1024, products) for _ in range(3)]
    for s in sums:
        s.add(rng.standard_normal((2048, 1024)).astype(np.float32))
    assert len(products._sessions) == 1
    assert not np.array_equal(sums[0].result(), sums[1].result())
