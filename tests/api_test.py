"""The public API: every name in ``dnr_jax.__all__`` resolves, and the list is pinned."""

import subprocess
import sys

import dnr_jax

# A rename or removal must change this list too, on purpose.
PUBLIC = [
    "Bundle", "CheckpointError", "ConfigError", "DNRError", "DNRState", "DataError",
    "ExperimentConfig", "Interrupted", "ListBatch", "LossConfig", "METHODS",
    "ModelConfig", "NoiseConfig", "PreparedLists", "Runner", "TrainConfig",
    "TrainingDiverged", "apply_method", "batch", "config", "create_state", "data",
    "errors", "export_reranker", "heuristic_scores", "load_bundle", "load_exported",
    "losses", "make_generator", "make_reranker", "metrics", "models", "noise",
    "prepare_lists", "protocol", "rerank", "run_experiment", "runtime", "score_lists",
    "serving", "step", "synthetic", "train", "train_and_evaluate", "train_step",
    "validate", "with_overrides",
]


def test_public_names_are_pinned():
  assert dnr_jax.__all__ == sorted(PUBLIC)


def test_every_public_name_resolves():
  for name in dnr_jax.__all__:
    assert getattr(dnr_jax, name) is not None, name
  assert dnr_jax.TrainConfig is dnr_jax.config.TrainConfig
  assert dnr_jax.Runner is dnr_jax.runtime.runner.Runner
  assert dnr_jax.load_bundle is dnr_jax.serving.load_bundle


def test_unknown_names_fail_like_a_module():
  try:
    dnr_jax.no_such_name  # pylint: disable=pointless-statement
  except AttributeError as e:
    assert "no_such_name" in str(e)
  else:
    raise AssertionError("dnr_jax.no_such_name resolved")


def test_importing_the_package_and_the_loader_stays_light():
  # A serving process loads an exported reranker with jax alone.
  code = ("import sys, dnr_jax, dnr_jax.errors, dnr_jax.serving.exported; "
          "heavy = [m for m in ('flax', 'optax', 'tensorflow_datasets', "
          "'dnr_jax.models', 'dnr_jax.step') if m in sys.modules]; "
          "assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
