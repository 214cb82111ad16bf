"""Helpers of the recipe tests: load a script of ``trainers/`` as a module, write a YAML config."""

import importlib.util
import os
import sys

import yaml

TRAINERS = os.path.join(os.path.dirname(__file__), os.pardir, "trainers")


def load_recipe(name: str):
    """Import ``trainers/<name>.py`` (not a package) as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(TRAINERS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def write_config(path, **values) -> str:
    """Write ``values`` as a YAML file at ``path``; returns the path as a string."""
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return str(path)
