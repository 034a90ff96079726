"""ONNX graphs of the towers: parity with torch (frozen and prompted, per-sample prompts, padding), the cache, failures.

The reference is `PromptedCLIP` on the same backbone. Prompts are randomised at scale 0.5 (keys and values), so
the prompt branch visibly changes the features and a parity check is not vacuous.
"""
import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from backbone import PromptConfig, PromptedCLIP
from backbone.onnx_export import GRAPHS, MANIFEST, TOP_GRAPHS, GraphSpec, OnnxCache, OnnxExportError, export_graph
from tests.conftest import TINY_NAMES, random_images, tiny_backbone

PARITY = 1e-4  # max abs, fp32, ONNX Runtime vs torch eager
SAME = 1e-6  # prompted graph at w = 0 vs frozen graph
ACTS = 1e-3  # prompts that act move features by more than this (10x the parity tolerance)
FULL = PromptConfig(depth=8, n_prefix=8)  # the graph's size (depth capped at the tiny towers' 2-3 layers)
SMALL = PromptConfig(depth=1, n_prefix=3)  # padded into the graph: 1 real layer of 3 real prefixes
TOP = 2  # image blocks of the top graphs in these exports (the default, a third of the tower, is 1 here)
TOP_FULL = PromptConfig(depth=TOP, n_prefix=8, placement="output")
TOP_SMALL = PromptConfig(depth=1, n_prefix=3, placement="output")  # in the top graph's last layer, 3 real prefixes


def randomize(model: PromptedCLIP, task: str, config: PromptConfig, seed: int) -> None:
    model.add_task(task, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_parameters(task):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (backbone, CachedGraphs): each tiny config exported once for the module, on first use."""
    root, done = tmp_path_factory.mktemp("onnx"), {}

    def get(name):
        if name not in done:
            backbone = tiny_backbone(name)
            done[name] = backbone, OnnxCache(root).ensure(backbone, GraphSpec.for_backbone(backbone, depth_top=TOP))
        return done[name]

    return get


@pytest.fixture(scope="module", params=TINY_NAMES)
def g(request, exports):
    """Graphs of one tiny config, ORT sessions, and the torch reference with two tasks."""
    backbone, cached = exports(request.param)
    assert cached.exported
    sessions = {name: ort.InferenceSession(str(cached.path(name)), providers=["CPUExecutionProvider"])
                for name in cached.spec.graphs}
    model = PromptedCLIP(backbone)
    randomize(model, "full", FULL, seed=1)
    randomize(model, "small", SMALL, seed=2)
    randomize(model, "top", TOP_FULL, seed=3)
    randomize(model, "top_small", TOP_SMALL, seed=4)
    images = random_images(backbone, 6)
    tokens = backbone.tokenizer(["a photo of a cat.", "a dog", "an airplane in the sky"])
    return SimpleNamespace(backbone=backbone, spec=cached.spec, s=sessions, model=model, images=images, tokens=tokens)


def padded(g, task: str | None, tower: str, garbage: bool = False, top: bool = False):
    """(keys, values, mask) of `task` zero-padded to the (top) graph's (depth, n), a top task in its last layers;
    `garbage`: random numbers in the padding."""
    depth, n, width = g.spec.depth_top if top else g.spec.depth(tower), g.spec.n_prefix, g.spec.width(tower)
    gen = torch.Generator().manual_seed(99)
    fill = (lambda: torch.randn(depth, n, width, generator=gen) * 3) if garbage else (lambda: torch.zeros(depth, n, width))
    keys, values, mask = fill(), fill(), torch.zeros(depth, n)
    if task is not None:
        config, state = g.model.config(task), g.model.task_state(task)
        layers = g.model.prompted_layers(tower, config)
        first = depth - len(layers) if top else 0
        for i, layer in enumerate(layers):
            keys[first + i, : config.n_prefix] = state[f"{tower}.{layer}.key"]
            values[first + i, : config.n_prefix] = state[f"{tower}.{layer}.value"]
            mask[first + i, : config.n_prefix] = 1
    return keys, values, mask


def run_images(g, rows, garbage=False, unmasked=False) -> np.ndarray:
    """Prompted image graph, one call; rows[i] = (task or None, w) of sample i."""
    parts = [padded(g, task, "visual", garbage) for task, _ in rows]
    mask = torch.stack([p[2] for p in parts])
    return g.s["image_prompted"].run(None, {
        "images": g.images[: len(rows)].numpy(),
        "prefix_keys": torch.stack([p[0] for p in parts]).numpy(),
        "prefix_values": torch.stack([p[1] for p in parts]).numpy(),
        "prefix_mask": (torch.ones_like(mask) if unmasked else mask).numpy(),
        "weight": np.array([w for _, w in rows], np.float32),
    })[0]


def run_top(g, rows, garbage=False) -> np.ndarray:
    """The split graphs, prompted: `image_bottom`, then `image_top_prompted`; rows[i] = (top task or None, w)."""
    activations = g.s["image_bottom"].run(None, {"images": g.images[: len(rows)].numpy()})[0]
    parts = [padded(g, task, "visual", garbage, top=True) for task, _ in rows]
    return g.s["image_top_prompted"].run(None, {
        "activations": activations,
        "prefix_keys": torch.stack([p[0] for p in parts]).numpy(),
        "prefix_values": torch.stack([p[1] for p in parts]).numpy(),
        "prefix_mask": torch.stack([p[2] for p in parts]).numpy(),
        "weight": np.array([w for _, w in rows], np.float32),
    })[0]


def run_text(g, task, w, garbage=False) -> np.ndarray:
    keys, values, mask = padded(g, task, "text", garbage)
    return g.s["text_prompted"].run(None, {
        "tokens": g.tokens.numpy(), "prefix_keys": keys.numpy(), "prefix_values": values.numpy(),
        "prefix_mask": mask.numpy(), "weight": np.array([w], np.float32),
    })[0]


def torch_images(g, rows) -> np.ndarray:
    with torch.no_grad():
        return g.model.encode_image(
            g.images[: len(rows)], [t for t, _ in rows], [w for _, w in rows], normalize=True
        ).numpy()


def torch_text(g, task=None, w=1.0) -> np.ndarray:
    with torch.no_grad():
        return g.model.encode_text(g.tokens, task=task, weight=w, normalize=True).numpy()


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_frozen_graphs_match_torch(g):
    frozen_images = g.s["image_frozen"].run(None, {"images": g.images.numpy()})[0]
    with torch.no_grad():
        want = g.model.encode_image(g.images, normalize=True).numpy()
    assert frozen_images.shape == want.shape and maxdiff(frozen_images, want) <= PARITY
    frozen_text = g.s["text_frozen"].run(None, {"tokens": g.tokens.numpy()})[0]
    assert maxdiff(frozen_text, torch_text(g)) <= PARITY


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_prompted_graphs_match_torch_at_each_weight(g, w):
    rows = [("full", w)] * 4
    got, want = run_images(g, rows), torch_images(g, rows)
    assert maxdiff(got, want) <= PARITY
    got_text, want_text = run_text(g, "full", w), torch_text(g, "full", w)
    assert maxdiff(got_text, want_text) <= PARITY
    if w > 0:  # the prompts really act (otherwise parity would say nothing)
        assert maxdiff(want, torch_images(g, [(None, 0.0)] * 4)) > ACTS
        assert maxdiff(want_text, torch_text(g)) > ACTS


def test_prompted_graph_at_zero_weight_matches_the_frozen_graph(g):
    frozen = g.s["image_frozen"].run(None, {"images": g.images.numpy()})[0]
    assert maxdiff(run_images(g, [("full", 0.0)] * 6), frozen) <= SAME
    assert maxdiff(run_images(g, [(None, 0.0), ("small", 0.0)] * 3), frozen) <= SAME
    frozen_text = g.s["text_frozen"].run(None, {"tokens": g.tokens.numpy()})[0]
    assert maxdiff(run_text(g, "full", 0.0), frozen_text) <= SAME


def test_a_mixed_batch_of_two_tasks_is_one_call(g):
    rows = [("full", 1.0), ("small", 0.3), (None, 0.0), ("full", 0.3), ("small", 1.0), ("full", 0.0)]
    got, want = run_images(g, rows), torch_images(g, rows)
    assert maxdiff(got, want) <= PARITY
    # each sample got its own task: the same image under the other task (or none) differs
    assert maxdiff(want[0], torch_images(g, [("small", 1.0)])[0]) > ACTS


def test_padding_a_smaller_task_is_exact_and_the_mask_is_what_makes_it_so(g):
    rows = [("small", 1.0), ("small", 0.3)]
    zero_padded = run_images(g, rows)
    assert maxdiff(zero_padded, torch_images(g, rows)) <= PARITY
    assert maxdiff(run_text(g, "small", 1.0), torch_text(g, "small", 1.0)) <= PARITY
    # masked slots and layers contribute exactly nothing: random numbers in the padding give the same bits
    assert np.array_equal(run_images(g, rows, garbage=True), zero_padded)
    assert np.array_equal(run_text(g, "small", 1.0, garbage=True), run_text(g, "small", 1.0))
    # without the mask, zero-padded keys take softmax mass (exp(q·0) = 1) and dilute the real prefixes
    assert maxdiff(run_images(g, rows, unmasked=True), zero_padded) > ACTS


def test_the_split_graphs_match_torch(g):
    """Prompts in the last blocks: the bottom once, the frozen top (pooled token, and the last block's input), the
    whole last block, and the prompted top with a mixed batch (a shallower task padded into its last layer)."""
    if not g.spec.depth_top:  # this tower's feature is not its last block's first token: torch serves such tasks
        assert not PromptedCLIP(g.backbone).pools_first_token() and set(g.s) == set(GRAPHS)
        return
    assert set(g.s) == set(GRAPHS + TOP_GRAPHS)
    activations = g.s["image_bottom"].run(None, {"images": g.images.numpy()})[0]
    pooled, last = g.s["image_top_frozen"].run(None, {"activations": activations})
    exact = g.s["image_last"].run(None, {"last": last})[0]
    with torch.no_grad():
        want = g.model.encode_image(g.images, normalize=True).numpy()
    assert maxdiff(pooled, want) <= PARITY and maxdiff(exact, want) <= PARITY
    rows = [("top", 1.0), ("top_small", 0.3), (None, 0.0), ("top", 0.3), ("top_small", 1.0), ("top", 0.0)]
    got, expected = run_top(g, rows), torch_images(g, rows)
    assert maxdiff(got, expected) <= PARITY
    assert maxdiff(expected[0], want[0]) > ACTS and maxdiff(expected[1], want[1]) > ACTS  # the prompts act
    assert np.array_equal(run_top(g, rows, garbage=True), got)  # the padding adds exactly nothing


def test_an_opset_without_an_operator_is_a_clear_export_error(g, tmp_path):
    spec = dataclasses.replace(g.spec, opset=13)  # scaled_dot_product_attention needs opset 14
    with pytest.raises(OnnxExportError, match=r"image_frozen graph .* opset 13 failed at operator aten::scaled_dot_product_attention"):
        export_graph(g.backbone, "image_frozen", spec, tmp_path / "x.onnx")


def test_the_cache_is_reused_and_a_damaged_or_stale_cache_is_reexported(exports, tmp_path, caplog):
    backbone, exported = exports(TINY_NAMES[0])
    spec = exported.spec
    cache = OnnxCache(tmp_path / "cache")
    directory = cache.directory(backbone)
    assert directory.name == f"{TINY_NAMES[0]}-{backbone.fingerprint.sha256[:16]}"
    manifest = json.loads((exported.directory / MANIFEST).read_text())
    assert manifest["spec"]["n_prefix"] == 8 and manifest["spec"]["opset"] == 17
    assert set(manifest["sha256"]) == set(spec.graphs) == set(GRAPHS + TOP_GRAPHS)
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    shutil.copytree(exported.directory, directory)  # what an earlier process left in the cache
    mtimes = {name: (directory / f"{name}.onnx").stat().st_mtime_ns for name in spec.graphs}

    reused = cache.ensure(backbone, spec)  # nothing exported, files untouched
    assert not reused.exported and reused.directory == directory
    assert {name: reused.path(name).stat().st_mtime_ns for name in spec.graphs} == mtimes

    path = reused.path("image_prompted")  # damage one graph: overwrite bytes in the middle
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="backbone.onnx_export"):
        again = cache.ensure(backbone, spec)
    assert again.exported and "damaged: checksum of image_prompted.onnx" in caplog.text
    assert cache.check(directory, cache.manifest_for(backbone, spec)) is None
    assert not cache.ensure(backbone, spec).exported
    assert sorted(os.listdir(cache.root)) == [directory.name]  # no temporary or set-aside directories left

    # a cache made by other versions or for another graph size is stale (and would be re-exported the same way)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["versions"]["onnxruntime"] = "0.0.1"
    (directory / MANIFEST).write_text(json.dumps(manifest))
    assert cache.check(directory, cache.manifest_for(backbone, spec)).startswith("stale: versions")
    bigger = dataclasses.replace(spec, n_prefix=16)
    assert cache.check(directory, cache.manifest_for(backbone, bigger)).startswith("stale: spec")
