"""The official archives of the raw data sets: md5 checks and extraction.

KuaiRand and MovieLens come as one archive each (``KuaiRand-Pure.tar.gz``,
``ml-1m.zip``) with a published md5; ``raw.RawBuilder`` checks it and extracts the
archive once, without TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
import zipfile

from absl import logging

from dnr_jax.errors import DataError


def md5sum(path: str, chunk: int = 8 << 20) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def verify_md5(path: str, expected: str) -> None:
  """Raises ``DataError`` naming the file when its md5 is not ``expected``."""
  logging.info("checking md5 of %s ...", path)
  actual = md5sum(path)
  if actual != expected:
    raise DataError(f"{path}: md5 {actual} does not match the published {expected}: "
                    "the file is corrupt or incomplete; delete it and fetch it again")


def extract_archive(archive: str, into: str, kind: str) -> str:
  """Extracts a ``.tar.gz`` / ``.tgz`` / ``.zip`` archive into ``into``, once.

  Not TFDS's extractor: it copies through ``tf.io.gfile`` and so needs TensorFlow,
  which is not a dependency. Extraction goes to a temporary sibling directory renamed
  at the end, so an interrupted extraction is never taken for a complete one;
  ``kind`` (the official file name) gives the format, since a downloaded file's name
  may carry URL parts. Tar members that would land outside ``into`` are refused
  (``filter="data"``).
  """
  if os.path.isdir(into):
    return into
  tmp = into + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  logging.info("extracting %s into %s ...", archive, into)
  t0 = time.time()
  try:
    if kind.endswith(".zip"):
      with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)
    elif kind.endswith((".tar.gz", ".tgz", ".tar")):
      with tarfile.open(archive) as tar:
        for member in tar:
          tar.extract(member, tmp, filter="data")
          if member.isfile() and member.size > 100 << 20:
            logging.info("  %s (%.1f GB, %.0fs)", member.name, member.size / 1e9,
                         time.time() - t0)
    else:
      raise DataError(f"{archive}: unknown archive type {kind!r}")
  except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"{archive}: cannot extract ({e}); the file is corrupt or "
                    "incomplete: delete it and fetch it again") from e
  os.rename(tmp, into)
  return into
