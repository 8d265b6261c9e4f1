import numpy as np

from data_prep.splits import heldout_mask


def test_heldout_split_is_stable_and_sized():
    ids = [f"demo-{i:06d}" for i in range(4000)]
    m = heldout_mask(ids, 0.1)
    assert 0.08 < m.mean() < 0.12
    # Order and subset independent: the decision is per id.
    assert np.array_equal(heldout_mask(ids[::-1], 0.1), m[::-1])
    assert np.array_equal(heldout_mask(ids[100:200], 0.1), m[100:200])
    assert not heldout_mask(ids, 0.0).any()
