"""TransposedProducts: aᵀ·b on MLAS, the same bytes whatever the threads or the slicing of b's columns."""

import numpy as np
import pytest

from lmc.passes.quantize.products import TransposedProducts


def test_products_match_numpy_and_do_not_depend_on_threads_or_slices():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((128, 700)).astype(np.float32)
    b = rng.standard_normal((128, 600)).astype(np.float32)
    products = TransposedProducts()
    one = products.into(a, b, np.empty((700, 600), np.float32), threads=1)
    two = products.into(a, b, np.empty((700, 600), np.float32), threads=2)
    np.testing.assert_allclose(one, a.T.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(one, two)
    left = products.into(a, np.ascontiguousarray(b[:, :256]), np.empty((700, 256), np.float32))
    np.testing.assert_array_equal(left, one[:, :256])


def test_products_refuse_what_they_cannot_multiply():
    products = TransposedProducts()
    a = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="shapes"):
        products.into(a, np.zeros((5, 2), np.float32), np.empty((3, 2), np.float32))
    with pytest.raises(ValueError, match="contiguous float32"):
        products.into(a.astype(np.float64), np.zeros((4, 2), np.float32), np.empty((3, 2), np.float32))
    with pytest.raises(ValueError, match="contiguous float32"):
        products.into(a, np.zeros((4, 2), np.float32), np.empty((2, 3), np.float32).T)
