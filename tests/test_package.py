"""The top-level package: ``from diffusers_raven import *`` works and shows exactly the public names."""

import json
import os
import subprocess
import sys

import pytest

# The public contract (DESIGN.md §3).
EXPECTED = {
    "DiffusionPipeline": "diffusers",
    "ModelMixin": "diffusers",
    "SchedulerMixin": "diffusers",
    "CausalWanTransformer3DModel": "diffusers_raven.models",
    "KVCache": "diffusers_raven.models",
    "ConsistencyFlowMatchScheduler": "diffusers_raven.schedulers",
    "FlowMatchSDEScheduler": "diffusers_raven.schedulers",
    "GaussianTransition": "diffusers_raven.schedulers",
    "CausalVideoPipeline": "diffusers_raven.pipelines",
    "CausalVideoPipelineOutput": "diffusers_raven.pipelines",
    "CausalVideoChunk": "diffusers_raven.pipelines",
    "CMGRPOConfig": "diffusers_raven.trainer",
    "CMGRPOTrainer": "diffusers_raven.trainer",
    "KVPOConfig": "diffusers_raven.trainer",
    "KVPOTrainer": "diffusers_raven.trainer",
    "ODERegressionConfig": "diffusers_raven.trainer",
    "ODERegressionTrainer": "diffusers_raven.trainer",
    "RavenConfig": "diffusers_raven.trainer",
    "RavenTrainer": "diffusers_raven.trainer",
}

# Runs in a fresh interpreter, so that nothing imported by other tests hides a missing name.
_PROBE = r"""
import importlib, json, sys, types
expected = json.loads(sys.argv[1])
before = set(globals())
from diffusers_raven import *
star = sorted(set(globals()) - before - {"before", "expected"})
import diffusers_raven
listed = [n for n in dir(diffusers_raven) if not n.startswith("_")]
public = sorted(n for n in listed if not isinstance(getattr(diffusers_raven, n), types.ModuleType))
print(json.dumps({
    "all": list(diffusers_raven.__all__),
    "star": star,
    "public": public,
    "same_object": {n: globals()[n] is getattr(importlib.import_module(m), n) for n, m in expected.items() if n in star},
}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(EXPECTED)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_star_import_resolves_every_name(probe):
    assert sorted(probe["all"]) == probe["star"]
    assert len(probe["all"]) == len(set(probe["all"]))


def test_all_is_the_public_contract(probe):
    assert set(probe["all"]) == set(EXPECTED)


def test_all_matches_the_names_the_package_lists(probe):
    assert probe["public"] == sorted(probe["all"])


def test_each_name_is_the_object_of_its_subpackage(probe):
    assert probe["same_object"] == dict.fromkeys(EXPECTED, True)


def test_unknown_name_is_an_attribute_error():
    import diffusers_raven

    with pytest.raises(AttributeError, match="NoSuchTrainer"):
        diffusers_raven.NoSuchTrainer  # noqa: B018
