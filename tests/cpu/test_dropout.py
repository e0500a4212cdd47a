"""The CPU kernels' dropout (`cliquejax.cpu.ops.dropout`: the keep mask from an integer hash
of each element's index): the tests of the reference's (tests/test_dropout.py) on it, its
bits uniform in every byte, and a key and the seed drawn from it give the same mask."""

import jax
import numpy as np
import pytest

from tests.test_dropout import (  # noqa: F401  (collected again here, on the CPU kernels)
    mask_of,
    test_dropped_fraction_is_the_rate,
    test_folded_streams_are_independent_and_fixed,
    test_gradient_is_the_scaled_mask,
    test_inactive_outside_training_or_at_rate_zero,
    test_kept_units_are_scaled_and_the_mean_is_kept,
    test_neighbours_are_independent,
    test_same_key_same_mask_other_key_independent_mask,
)

cpu_ops = pytest.importorskip("cliquejax.cpu.ops")


@pytest.fixture
def k():
    return cpu_ops.OPS


def test_bits_are_uniform_in_every_byte():
    bits = np.asarray(cpu_ops.dropout_bits(jax.random.PRNGKey(5), (1 << 18,)))
    expected = bits.size / 256
    for shift in (0, 8, 16, 24):
        counts = np.bincount((bits >> shift) & 0xFF, minlength=256)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 350, (shift, chi2)  # 255 degrees of freedom: P(chi2 > 350) < 1e-4


def test_a_key_and_its_seed_give_the_same_mask(k):
    key = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(mask_of(k, key), mask_of(k, cpu_ops.dropout_seed(key)))
