"""Tests of the k-core filter."""

import numpy as np
import pytest

from dnr_jax.data import preprocess, types


def _log(users, items):
  users, items = np.array(users, np.int32), np.array(items, np.int32)
  nu, ni = users.max() + 1, items.max() + 1
  return types.Interactions(
      user=users, item=items, time=np.arange(len(users), dtype=np.int64),
      label=np.ones(len(users), np.int8), columns={"rating": np.arange(len(users))},
      user_raw_id=np.arange(nu) * 10, item_raw_id=np.arange(ni) * 100,
      user_features=np.arange(nu)[:, None].astype(np.int32),
      item_features=np.zeros((ni, 0), np.int32), name="hand")


def test_k_core_iterates_to_a_fixpoint_and_redensifies():
  # Users 1, 2 rate items 1, 2 (a 2-core); user 3 rates items 2 and 3, but item 3 has
  # a single rating, and once it goes user 3 has one rating left: both must go.
  log = _log([1, 1, 2, 2, 3, 3], [1, 2, 1, 2, 2, 3])
  out = preprocess.k_core(log, 2)
  np.testing.assert_array_equal(out.user, [1, 1, 2, 2])
  np.testing.assert_array_equal(out.item, [1, 2, 1, 2])
  np.testing.assert_array_equal(out.user_raw_id, [0, 10, 20])
  np.testing.assert_array_equal(out.item_raw_id, [0, 100, 200])
  np.testing.assert_array_equal(out.columns["rating"], [0, 1, 2, 3])
  np.testing.assert_array_equal(out.user_features[:, 0], [0, 1, 2])
  assert np.all(np.diff(out.time) > 0)


def test_k_core_redensifies_gaps():
  log = _log([5, 5, 7, 7], [3, 9, 3, 9])
  out = preprocess.k_core(log, 2)
  np.testing.assert_array_equal(out.user, [1, 1, 2, 2])
  np.testing.assert_array_equal(out.item, [1, 2, 1, 2])
  assert out.num_users == 3 and out.num_items == 3


def test_k_core_errors():
  with pytest.raises(ValueError, match="k=0"):
    preprocess.k_core(_log([1], [1]), 0)
  with pytest.raises(ValueError, match="no interaction survives the 3-core"):
    preprocess.k_core(_log([1, 2], [1, 1]), 3)
