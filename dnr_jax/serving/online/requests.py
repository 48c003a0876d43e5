"""One online reranking request: its JSON body, its checks, and a batch as arrays.

A request holds one list in raw ids, as a ranking system sends it::

  {"user_id": "u17",                       # required; a string or an integer
   "item_ids": ["v3", "v9", "v1"],         # required; the candidates, upstream order
   "scores": [0.91, 0.55, 0.40],           # required; their upstream scores
   "history": ["v7", "v2"],                # optional; the user's items, oldest first
   "features": {"u_age": "30",             # optional; user features: one value,
                "i_genre": ["a", "b", "a"]},  # item features: one per candidate
   "list_id": "req-1"}                     # optional; echoed back

and gets back the candidates in the reranker's order (values for illustration)::

  {"list_id": "req-1", "item_ids": ["v9", "v3", "v1"],
   "scores": [1.73, 0.20, -0.41], "reranked": 3, "unknown_ids": 0}

``scores`` are the reranker's logits (higher = shown first; ``null`` for candidates
past the reranker's ``n``, which follow the reranked ones in upstream order and are
counted by ``reranked``). Ids map through the run's vocabulary exactly as
``experiments.rerank`` maps a lists file (``dnr_jax.data.own_lists.read_lists``):
unknown ids become 0 and are counted in ``unknown_ids``; a history keeps its last
``H`` known items, right-aligned; a feature the request leaves out is 0 (unknown).

``check_request`` validates one body and names the first problem in one line
(``RequestError``: field and problem); ``check_lists`` a body of several lists
(``{"lists": [<request>, ...]}``, answered ``{"results": [<reply>, ...]}``);
``batches`` turns a batch of checked requests into the ``dnr_jax.batch`` arrays and
the batch's logits into the replies. The online service (``service``) checks each
request in its HTTP process, so a bad request is answered 400 there and never
reaches a batch.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Mapping, Optional

from dnr_jax.errors import DataError

# The endpoint a request is posted to.
PATH = "/rerank"
# The endpoint for several lists in one request (``check_lists``).
LISTS_PATH = "/rerank_lists"
# A history longer than this is refused: only its last H known items are read, and an
# unbounded list is a way to make one request cost the whole batch.
MAX_HISTORY = 10_000
FIELDS = ("list_id", "user_id", "item_ids", "scores", "history", "features")


class RequestError(DataError):
  """A bad request: one line, ``"<field>: <problem>"``."""


@dataclasses.dataclass(frozen=True)
class RequestLimits:
  """What a request may hold, from the reranker it is sent to.

  Attributes:
    list_size: ``n``, the candidates the reranker reads (the first ``n`` in upstream
      order are reranked).
    history_size: ``H``, the history items it reads.
    max_candidates: the most candidates a request may send (``>= n``); those past
      ``n`` are returned after the reranked ones, in upstream order.
    score_transform: ``none`` (scores must lie in [0, 1]) or ``sigmoid`` (logits,
      squashed as in training), from the run's data config.
    user_features / item_features: the feature names the reranker was trained with.
  """
  list_size: int
  history_size: int
  max_candidates: int
  score_transform: str = "none"
  user_features: tuple[str, ...] = ()
  item_features: tuple[str, ...] = ()

  def __post_init__(self):
    if self.list_size < 1 or self.history_size < 1:
      raise ValueError(f"list_size={self.list_size} and history_size="
                       f"{self.history_size} must be >= 1")
    if self.max_candidates < self.list_size:
      raise ValueError(f"max_candidates={self.max_candidates} must be >= the "
                       f"reranker's n={self.list_size}")

  @classmethod
  def from_bundle(cls, bundle, max_candidates: Optional[int] = None
                  ) -> "RequestLimits":
    """The limits of a trained own-lists bundle (``serving.load_bundle``)."""
    vocab = bundle.vocabulary()
    n = int(bundle.meta.get("list_size") or (bundle.data_config or {}).get("list_size"))
    h = int(bundle.meta.get("history_size")
            or (bundle.data_config or {}).get("history_size"))
    return cls(list_size=n, history_size=h, max_candidates=max_candidates or n,
               score_transform=(bundle.data_config or {}).get("score_transform",
                                                              "none"),
               user_features=tuple(vocab.user_features),
               item_features=tuple(vocab.item_features))


@dataclasses.dataclass
class CheckedRequest:
  """A request that passed ``check_request``: ids as text, scores as floats."""
  user_id: str
  item_ids: list[str]
  scores: list[float]
  history: list[str]
  user_features: dict[str, str]
  item_features: dict[str, list[str]]
  list_id: Any = None
  # As sent, where they differ from ``item_ids`` (integer ids: a reply gives them back
  # as sent); None where they are ``item_ids``.
  raw_item_ids: Optional[list] = None

  def __reduce__(self):
    # Every request crosses a pipe to the worker: pickled as its fields alone, it
    # skips the dataclass default's copyreg path both ways
    # (docs/serving_tuning.md, round 5).
    return (CheckedRequest, _checked_fields(self))


# The fields of a CheckedRequest in their order, read in one C-level call.
_checked_fields = operator.attrgetter(
    *(f.name for f in dataclasses.fields(CheckedRequest)))


def _id(value, where: str) -> str:
  # 5 and "5" are one id, as in the lists files; a float or a bool is not an id.
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise RequestError(f"{where}: an id is a string or an integer, not "
                       f"{_show(value)}")
  text = value if isinstance(value, str) else str(value)
  if not text:
    raise RequestError(f"{where}: empty id")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    # Valid JSON ("\ud800"), but no id: caught here, it would fail a whole batch.
    raise RequestError(f"{where}: not valid Unicode text ({e.reason})") from None
  return text


def _show(value) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _ids(values, where: str) -> list[str]:
  if not isinstance(values, list):
    raise RequestError(f"{where}: expected a list of ids, got {_show(values)}")
  # The common case in one pass, without a location string per id (a fifth of the
  # HTTP process's checking time): non-empty strings, or integers, that encode
  # together. Anything else goes through ``_id`` one by one, which names the first
  # bad id.
  texts = [v if type(v) is str else str(v) if type(v) is int else None  # pylint: disable=unidiomatic-typecheck
           for v in values]
  if None not in texts and "" not in texts:
    try:
      "".join(texts).encode("utf-8")
      return texts
    except UnicodeEncodeError:
      pass
  return [_id(v, f"{where}[{i}]") for i, v in enumerate(values)]


def _scores(raw: list, score_transform: str) -> list[float]:
  # The common case in a few C-level passes: every score a float or an integer (bool
  # is neither type), their sum finite (so none is NaN or infinite), within [0, 1]
  # where they must be. Anything else goes through the loop, which names the first
  # bad score (and passes them all if the sum only overflowed).
  if set(map(type, raw)) <= {float, int}:
    try:
      scores = list(map(float, raw))
    except OverflowError:   # an integer past float's range: named below
      scores = [math.inf]
    if math.isfinite(sum(scores)) and (score_transform != "none" or not scores or (
        min(scores) >= 0.0 and max(scores) <= 1.0)):
      return scores
  scores = []
  for i, s in enumerate(raw):
    if isinstance(s, bool) or not isinstance(s, (int, float)):
      raise RequestError(f"scores[{i}]: expected a number, got {_show(s)}")
    try:
      s = float(s)
    except OverflowError:
      raise RequestError(f"scores[{i}]: non-finite score (an integer of "
                         f"{len(str(s))} digits)") from None
    if not math.isfinite(s):
      raise RequestError(f"scores[{i}]: non-finite score {s}")
    if score_transform == "none" and not 0.0 <= s <= 1.0:
      raise RequestError(f"scores[{i}]: {s:g} is outside [0, 1] (this reranker was "
                         "trained on scores in [0, 1], score_transform=none)")
    scores.append(s)
  return scores


def check_request(body: Any, limits: RequestLimits) -> CheckedRequest:
  """Checks one request body (the parsed JSON) against ``limits``.

  Returns:
    the ``CheckedRequest``.

  Raises:
    RequestError: the first problem found, ``"<field>: <problem>"`` (a missing or
      unknown field, a wrong type, lists of different lengths, a non-finite or
      out-of-range score, a repeated candidate, too many candidates, an unknown
      feature).
  """
  if not isinstance(body, Mapping):
    raise RequestError(f"body: expected a JSON object, got {_show(body)}")
  unknown = [k for k in body if k not in FIELDS]
  if unknown == ["lists"]:
    raise RequestError(f"lists: unknown field (one list per request here; post "
                       f"several to {LISTS_PATH})")
  if unknown:
    raise RequestError(f"{unknown[0]}: unknown field (a request has {list(FIELDS)})")
  for field in ("user_id", "item_ids", "scores"):
    if field not in body or body[field] is None:
      raise RequestError(f"{field}: missing (required)")
  user = _id(body["user_id"], "user_id")
  items = _ids(body["item_ids"], "item_ids")
  if not items:
    raise RequestError("item_ids: empty (a list needs at least one candidate)")
  if len(items) > limits.max_candidates:
    raise RequestError(f"item_ids: {len(items)} candidates, more than the "
                       f"{limits.max_candidates} this service takes (max_candidates; "
                       f"the reranker reads the first {limits.list_size})")
  if len(set(items)) != len(items):
    seen = set()
    for i, item in enumerate(items):
      if item in seen:
        raise RequestError(f"item_ids[{i}]: {item!r} appears twice in the list")
      seen.add(item)
  raw_scores = body["scores"]
  if not isinstance(raw_scores, list):
    raise RequestError(f"scores: expected a list of numbers, got {_show(raw_scores)}")
  if len(raw_scores) != len(items):
    raise RequestError(f"scores: {len(raw_scores)} scores for {len(items)} item_ids "
                       "(one score per candidate)")
  scores = _scores(raw_scores, limits.score_transform)
  history = body.get("history")
  history = [] if history is None else _ids(history, "history")
  if len(history) > MAX_HISTORY:
    raise RequestError(f"history: {len(history)} items, more than {MAX_HISTORY} (the "
                       f"reranker reads the last {limits.history_size})")
  features = body.get("features")
  features = {} if features is None else features
  if not isinstance(features, Mapping):
    raise RequestError(f"features: expected an object of feature values, got "
                       f"{_show(features)}")
  user_features, item_features = {}, {}
  for name, value in features.items():
    if name in limits.user_features:
      user_features[name] = _id(value, f"features.{name}")
    elif name in limits.item_features:
      values = _ids(value, f"features.{name}")
      if len(values) != len(items):
        raise RequestError(f"features.{name}: {len(values)} values for {len(items)} "
                           "item_ids (one per candidate)")
      item_features[name] = values
    else:
      known = list(limits.user_features + limits.item_features)
      raise RequestError(f"features.{name}: not a feature of this reranker (it has "
                         f"{known or 'none'})")
  return CheckedRequest(user_id=user, item_ids=items, scores=scores, history=history,
                        user_features=user_features, item_features=item_features,
                        list_id=body.get("list_id"),
                        raw_item_ids=(None if items == body["item_ids"]
                                      else list(body["item_ids"])))


def check_lists(body: Any, limits: RequestLimits, max_lists: int
                ) -> list[CheckedRequest]:
  """Checks a body of several lists, ``{"lists": [<request>, ...]}``.

  Each list is a request body of its own (``check_request``). The HTTP cost of a
  request is paid once for all of its lists, while each list is batched and scored
  as if it had come alone.

  Returns:
    the ``CheckedRequest`` of each list, in the body's order.

  Raises:
    RequestError: the first problem found, its field named from the body
      (``"lists[3].scores[0]: non-finite score nan"``); a body with no lists, or
      more than ``max_lists``.
  """
  if not isinstance(body, Mapping):
    raise RequestError('body: expected a JSON object {"lists": [...]}, got '
                       f"{_show(body)}")
  unknown = [k for k in body if k != "lists"]
  if unknown and "lists" not in body and "item_ids" in body:
    raise RequestError(f'body: one list, where this path takes {{"lists": [...]}} '
                       f"(post one list to {PATH})")
  if unknown:
    raise RequestError(f'{unknown[0]}: unknown field (a request has ["lists"])')
  lists = body.get("lists")
  if not isinstance(lists, list) or not lists:
    raise RequestError(f"lists: expected a non-empty list of lists, got {_show(lists)}")
  if len(lists) > max_lists:
    raise RequestError(f"lists: {len(lists)} lists, more than the {max_lists} a "
                       "request may hold (max_lists_per_request)")
  out = []
  for i, one in enumerate(lists):
    try:
      out.append(check_request(one, limits))
    except RequestError as e:
      line = str(e)
      raise RequestError(f"lists[{i}]{line[4:]}" if line.startswith("body:")
                         else f"lists[{i}].{line}") from None
  return out
