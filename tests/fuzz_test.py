"""Property-based tests (hypothesis): the log parsers and the list builder either
load an input correctly or fail with the project's own error type, never with an
unhandled exception.

Small inputs and a few dozen examples each: the suite runs on 2 CPU cores.
"""

import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnr_jax.data import csv_reader, kuairand, lists, movielens, retriever, types
from dnr_jax.errors import DataError
from dnr_jax.data.csv_reader import Column, FileSpec
from dnr_jax.errors import DNRError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _write(tmp_path_factory, data: bytes):
  path = tmp_path_factory.mktemp("fuzz") / "x.csv"
  path.write_bytes(data)
  return str(path)


def _load(path, columns, spec=FileSpec(), chunk_bytes=64 << 20):
  """Every chunk concatenated, or the DataError (anything else fails the test)."""
  try:
    parts = [c for c, _, _ in csv_reader.iter_chunks(path, columns, spec, chunk_bytes)]
  except DataError as e:
    assert "\n" not in str(e) and path in str(e)    # one line, naming the file
    return None
  return {c.name: np.concatenate([p[c.name] for p in parts]) if parts else None
          for c in columns}


# ---- the generic reader: arbitrary bytes ------------------------------------------------

_SMALL = [Column("a", min=0, max=100), Column("b", kind="float", dtype="float32",
                                              nullable=True),
          Column("c", kind="str", dtype="object", nullable=True)]


@FUZZ
@given(body=st.binary(max_size=200), chunk=st.integers(1, 64))
def test_reader_on_arbitrary_bytes(tmp_path_factory, body, chunk):
  _load(_write(tmp_path_factory, b"a,b,c\n" + body), _SMALL, chunk_bytes=chunk)


_FIELD = st.one_of(st.integers(-5, 120).map(str), st.just(""), st.just("nan"),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text("0123456789.-eE ,\"x", max_size=6))


@FUZZ
@given(rows=st.lists(st.lists(_FIELD, min_size=2, max_size=4), max_size=12),
       end=st.sampled_from(["\n", "\r\n", ""]), chunk=st.integers(1, 64))
def test_reader_on_csv_like_rows(tmp_path_factory, rows, end, chunk):
  text = "a,b,c\n" + "\n".join(",".join(r) for r in rows) + (end if rows else "")
  got = _load(_write(tmp_path_factory, text.encode()), _SMALL, chunk_bytes=chunk)
  if got is None or got["a"] is None:
    return
  # Loaded: every value is what the file says, in range, in file order.
  assert len(got["a"]) == len(rows)
  assert got["a"].min() >= 0 and got["a"].max() <= 100
  for row, a in zip(rows, got["a"]):
    assert int(row[0].strip()) == a


@FUZZ
@given(ints=st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6),
                               st.integers(1, 5), st.integers(0, 2**40)),
                     min_size=1, max_size=15),
       cut=st.integers(0, 12), chunk=st.integers(1, 80))
def test_movielens_ratings_are_loaded_exactly_or_a_cut_is_caught(tmp_path_factory, ints,
                                                                 cut, chunk):
  """ML-1M's ``::`` format: a complete file loads exactly; any cut inside the last
  line (the issue's ``60::14::2::9``) is a DataError, never a wrong rating."""
  text = "".join("::".join(map(str, r)) + "\n" for r in ints).encode()
  kept = text[:max(0, len(text) - cut)]
  spec = movielens._tables_1m()[0].spec
  got = _load(_write(tmp_path_factory, kept), movielens._RATING, spec, chunk)
  if kept and not kept.endswith(b"\n"):
    assert got is None                    # cut inside a line: caught
    return
  rows = kept.count(b"\n")               # whole lines: exactly those ratings
  assert got is not None
  if rows:
    np.testing.assert_array_equal(got["timestamp"], [r[3] for r in ints[:rows]])
    np.testing.assert_array_equal(got["rating"], [r[2] for r in ints[:rows]])
    np.testing.assert_array_equal(got["user_id"], [r[0] for r in ints[:rows]])


_ML_FIELD = st.one_of(st.integers(-3, 10**7).map(str), st.just(""),
                      st.text("0123456789:-x\t ", max_size=5))


@FUZZ
@given(rows=st.lists(st.lists(_ML_FIELD, min_size=3, max_size=5), max_size=10),
       chunk=st.integers(1, 64))
def test_movielens_ratings_on_garbage(tmp_path_factory, rows, chunk):
  text = "".join("::".join(r) + "\n" for r in rows).encode("latin-1")
  spec = movielens._tables_1m()[0].spec
  got = _load(_write(tmp_path_factory, text), movielens._RATING, spec, chunk)
  if got is not None and got["rating"] is not None:
    assert got["rating"].min() >= 1 and got["rating"].max() <= 5
    assert len(got["rating"]) == len(rows)


@FUZZ
@given(rows=st.lists(st.lists(st.one_of(st.integers(-2, 3).map(str), st.just(""),
                                        st.just("20220408"), st.just("1200"),
                                        st.just("x")),
                              min_size=19, max_size=19), max_size=8),
       chunk=st.integers(8, 200))
def test_kuairand_log_reader(tmp_path_factory, rows, chunk):
  header = ",".join(c.name for c in kuairand.LOG_COLUMNS)
  text = header + "\n" + "".join(",".join(r) + "\n" for r in rows)
  got = _load(_write(tmp_path_factory, text.encode()), list(kuairand.LOG_COLUMNS),
              FileSpec(), chunk)
  if got is not None and got["user_id"] is not None:
    assert len(got["user_id"]) == len(rows)
    for col in kuairand.LOG_COLUMNS:    # every value in its documented range
      lo = -math.inf if col.min is None else col.min
      hi = math.inf if col.max is None else col.max
      assert ((got[col.name] >= lo) & (got[col.name] <= hi)).all(), col.name


@pytest.fixture(scope="module")
def ml_builder(tmp_path_factory):
  root = tmp_path_factory.mktemp("ml")
  return movielens.Movielens(config="1m", data_dir=str(root / "tfds"),
                             source_dir=str(root))


@FUZZ
@given(rows=st.lists(st.tuples(st.integers(-1, 50).map(str),
                               st.sampled_from(["F", "M", "", "X::Y"]),
                               st.sampled_from(["1", "18", "", "a"]),
                               st.sampled_from(["0", "20", ""]),
                               st.text("0123456789-", max_size=5)), max_size=8))
def test_movielens_users_through_the_builder(tmp_path_factory, ml_builder, rows):
  """users.dat through the builder's own block generator (categorical codes too)."""
  path = _write(tmp_path_factory, "".join("::".join(r) + "\n" for r in rows).encode())
  table = movielens._tables_1m()[1]
  try:
    blocks = [b["users"] for _, b in ml_builder._generate_examples(
        table, {"users.dat": path})]
  except DNRError as e:
    assert "\n" not in str(e)
    return
  n = sum(len(b["user_id"]) for b in blocks)
  assert n == len(rows)
  for b in blocks:
    for f in movielens.USER_FEATURES:
      assert b[f].dtype == np.int32 and (b[f] >= 1).all()


# ---- the list builder -------------------------------------------------------------------

NUM_USERS, NUM_ITEMS = 7, 13
PARAMS = retriever.init_params(NUM_USERS, NUM_ITEMS, 4, jax.random.PRNGKey(0))


@st.composite
def _logs(draw):
  n = draw(st.integers(0, 60))
  user = np.array(draw(st.lists(st.integers(1, NUM_USERS - 1), min_size=n,
                                max_size=n)), np.int32)
  item = np.array(draw(st.lists(st.integers(1, NUM_ITEMS - 1), min_size=n,
                                max_size=n)), np.int32)
  time = np.sort(np.array(draw(st.lists(st.integers(0, 10**6), min_size=n,
                                        max_size=n)), np.int64))
  label = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), np.int8)
  return types.Interactions(
      user=user, item=item, time=time, label=label, columns={},
      user_raw_id=np.arange(NUM_USERS), item_raw_id=np.arange(NUM_ITEMS),
      user_features=np.zeros((NUM_USERS, 1), np.int32),
      item_features=np.zeros((NUM_ITEMS, 1), np.int32), user_feature_vocab=(1,),
      item_feature_vocab=(1,), name="fuzz")


_LIST_CONFIGS = st.builds(
    lists.ListConfig, protocol=st.sampled_from(lists.PROTOCOLS),
    list_size=st.integers(3, NUM_ITEMS + 1), history_size=st.integers(1, 4),
    window=st.integers(1, 2), min_list_size=st.integers(1, 3),
    retriever_fraction=st.sampled_from([0.2, 0.5]),
    valid_fraction=st.just(0.2), test_fraction=st.just(0.2))


@settings(FUZZ, max_examples=40)
@given(log=_logs(), config=_LIST_CONFIGS)
def test_list_builder_builds_valid_lists_or_says_why_not(log, config):
  try:
    out = lists.build_lists(log, PARAMS, config)
  except DNRError as e:
    assert "\n" not in str(e)
    return
  n = config.list_size
  for name, split in out.splits.items():
    assert len(split["user"]) == out.report[name]["lists"] > 0
    assert split["items"].shape[1:] == (n,) and split["history"].shape[1:] == (
        config.history_size,)
    mask = split["mask"]
    assert (mask.sum(1) >= 1).all()
    assert not (split["items"][~mask]).any() and (split["items"][mask] >= 1).all()
    assert (split["items"] < NUM_ITEMS).all() and (split["history"] < NUM_ITEMS).all()
    assert not (split["labels"][~mask]).any()
    assert set(np.unique(split["labels"])) <= {0.0, 1.0}
    s = split["scores"]                                       # retriever rank order
    assert ((s[:, 1:] <= s[:, :-1] + 1e-6) | ~mask[:, 1:]).all()
