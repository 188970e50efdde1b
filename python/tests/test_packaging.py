"""pyproject.toml's extras are the ones the deployment guide and the docs promise: `pip install tensorstream[all]`
brings everything, `[hf]`, `[serve]`, `[metrics]`, `[plot]` each what their feature imports, and the core none."""

from __future__ import annotations

import pathlib
import re

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def names(specs):
    return {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def test_extras_cover_each_feature_and_all_is_their_union():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: names(specs) for name, specs in project["optional-dependencies"].items()}
    assert {"hf", "serve", "metrics", "plot", "all"} <= set(extras)
    assert project["dependencies"] == []  # import tensorstream needs nothing; torch is imported where used
    assert {"torch", "transformers", "safetensors", "accelerate"} <= extras["hf"]
    assert {"fastapi", "uvicorn", "prometheus-client", "transformers", "torch"} <= extras["serve"]
    assert extras["metrics"] == {"prometheus-client"} and extras["plot"] == {"matplotlib"}
    union = set().union(*(specs for name, specs in extras.items() if name != "all"))
    assert extras["all"] == union
    assert project["scripts"]["tensorstream"] == "tensorstream.cli:main"
