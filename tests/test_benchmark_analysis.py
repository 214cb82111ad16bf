"""The teacher-scaling analysis of ``benchmarks/teacher_scaling.py``: its fit, its projection and its input checks."""

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_scaling():
    spec = importlib.util.spec_from_file_location("teacher_scaling", ROOT / "benchmarks" / "teacher_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scaling = _load_scaling()


def test_log_steps_fit_matches_numpy_polyfit_and_projects_back_onto_the_line():
    rng = np.random.default_rng(0)
    steps = np.array([4000.0, 6366.0, 10305.0, 21840.0, 50000.0])
    values = 0.55 + 0.04 * np.log2(steps / 10_000) + rng.normal(0, 0.01, size=steps.shape)
    a, b = scaling.fit_log_steps(steps, values)
    slope, intercept = np.polyfit(np.log2(steps / 10_000), values, 1)  # independent least squares
    assert a == pytest.approx(intercept, abs=1e-12) and b == pytest.approx(slope, abs=1e-12)

    target = 0.85
    reached = scaling.steps_to_reach(a, b, target)
    assert a + b * math.log2(reached / 10_000) == pytest.approx(target, abs=1e-9)
    # one doubling more per b of accuracy
    assert scaling.steps_to_reach(a, b, target + b) == pytest.approx(2 * reached, rel=1e-9)
    assert scaling.steps_to_reach(a, 0.0, target) == math.inf
    assert scaling.steps_to_reach(a, -0.01, target) == math.inf

    with pytest.raises(ValueError, match="same length"):
        scaling.fit_log_steps([1000, 2000], [0.5])
    with pytest.raises(ValueError, match=">= 2"):
        scaling.fit_log_steps([1000], [0.5])


def test_chain_results_must_share_captions_and_score_alike():
    results = ROOT / "docs" / "experiments" / "shapesworld" / "results"
    reference = json.loads((results / "shapes_teacher_long_128.json").read_text())
    scaling.check_comparable(copy.deepcopy(reference), reference, "same")

    other_fingerprint = copy.deepcopy(reference)
    other_fingerprint["evaluator"] = "0123456789ab"  # same scores: accepted
    scaling.check_comparable(other_fingerprint, reference, "fingerprint")

    rescored = copy.deepcopy(other_fingerprint)
    rescored["models"]["vae_round_trip"]["semantic_accuracy_per_video"][0] += 0.125
    with pytest.raises(SystemExit, match="scores vae_round_trip differently"):
        scaling.check_comparable(rescored, reference, "rescored")

    other_captions = copy.deepcopy(reference)
    other_captions["captions"] = other_captions["captions"][::-1]
    with pytest.raises(SystemExit, match="other captions"):
        scaling.check_comparable(other_captions, reference, "captions")
