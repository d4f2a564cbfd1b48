"""The train batch plan's exact replay of numpy's draws (trm_jax.sampler).

The batches it plans are checked against a plain reimplementation of the
original's sampler in tests/test_data.py, through the input pipeline.
"""
import numpy as np

from trm_jax import sampler


def test_sequential_integers_equals_numpy_calls():
  assert sampler.fast_integers_match_numpy()
  check = np.random.default_rng(5)
  spans = check.choice([1, 2, 3, 1000, 2**31 + 7, 2**32 - 2], size=3000, p=[.3, .1, .1, .3, .1, .1])
  low = check.integers(0, 10**6, spans.size)
  for seed in range(3):
    a = np.random.Generator(np.random.Philox(seed=seed))
    b = np.random.Generator(np.random.Philox(seed=seed))
    for g in (a, b):
      g.permutation(5 + seed)  # Leaves a buffered 32-bit half for some seeds.
    want = [a.integers(lo, lo + s) for lo, s in zip(low.tolist(), spans.tolist())]
    got = sampler.sequential_integers(b, low, low + spans)
    np.testing.assert_array_equal(got, want)
    assert str(a.bit_generator.state) == str(b.bit_generator.state)
