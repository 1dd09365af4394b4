"""Shared, cached set-up: tracing and analysing each zoo model once per test session."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402

import graphprune  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "data" / "models" / "stories260K"
ARCHS = sorted(zoo.ALL)


@functools.lru_cache(maxsize=None)
def analysed(name: str):
    """(model, traced, dependency graph) of a zoo model, built once."""
    model = zoo.ALL[name]()
    traced = graphprune.trace(model, example_kwargs=zoo.example_inputs(name))
    return model, traced, graphprune.analyze(traced)


def planted_mlp(model, factor: float, layer: int = 0, zero: int = 3, dominant: int = 5):
    """A copy of a Llama-style ``model`` whose MLP channel ``zero`` of ``layer`` is zeroed and
    channel ``dominant`` scaled by ``factor`` (gate/up rows and down_proj columns)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        mlp = model.model.layers[layer].mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[zero] = 0.0
            lin.weight[dominant] *= factor
        mlp.down_proj.weight[:, zero] = 0.0
        mlp.down_proj.weight[:, dominant] *= factor
    return model


def outputs(x) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def fresh_inputs(name: str, traced, batch: int, seq: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return graphprune.api.random_inputs(traced.example_kwargs, batch, seq, gen, zoo._vocab_size(name))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.exists():
        pytest.fail(f"shipped model missing: {STORIES} (is ../shared beside the repo?)")
    return STORIES


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several threads crawl on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
