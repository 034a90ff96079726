"""The ONNX Runtime path of the engine: same answers as torch, tasks larger than the graphs on torch, the runtime
setting (torch | onnx | auto) and the logged fallback to torch when the graphs cannot be exported."""
import re

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from backbone import PromptConfig, UnknownTask, load_backbone
from backbone.onnx_export import GRAPHS, TOP_GRAPHS
from service.engine import Engine
from service.runtime import Runtime, TorchRuntime
from service.runtime_onnx import OnnxRuntime, _GraphResume
from service.settings import ServiceSettings
from testkit.tasks import color_sample, make_color_task

from .conftest import TINY_JSON

PARITY = 1e-4


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx-cache"))  # one export of the served tiny backbone for this module


@pytest.fixture(scope="module")
def runtimes(tiny_checkpoint, onnx_cache):
    """An ONNX runtime and, on a separately loaded copy of the same weights, the torch runtime to compare with."""
    onnx = OnnxRuntime(load_backbone(TINY_JSON, tiny_checkpoint, "cpu"), cache_dir=onnx_cache)
    return onnx, TorchRuntime(load_backbone(TINY_JSON, tiny_checkpoint, "cpu"))


def color_batch(runtime, *names, seed=7):
    return torch.stack([runtime.preprocess(Image.fromarray(color_sample(n, 1, seed=seed + i)[0])) for i, n in enumerate(names)])


def load_both(runtimes, slot, artifact):
    config = PromptConfig.from_dict(artifact.recipe["prompts"])
    for rt in runtimes:
        rt.load_task(slot, artifact.prompts, config)


def test_onnx_runtime_answers_like_the_torch_runtime(runtimes, task_maker):
    onnx, ref = runtimes
    assert isinstance(onnx, Runtime) and onnx.embed_dim == ref.embed_dim and onnx.fingerprint == ref.fingerprint
    # hand-made tasks have depth 2 and 4 prefixes: padded (and masked) into the graphs' 3 layers x 8 prefixes
    load_both(runtimes, "red#1", make_color_task(task_maker, "red", seed=0, prompt_scale=0.5))
    load_both(runtimes, "green#1", make_color_task(task_maker, "green", seed=1, prompt_scale=0.5))
    try:
        images = color_batch(onnx, "red", "green", "blue", "red", "green")
        tasks, weights = ["red#1", "green#1", None, "red#1", "green#1"], [1.0, 0.3, 0.0, 0.5, 0.0]
        assert (onnx.encode_image(images) - ref.encode_image(images)).abs().max() <= PARITY
        prompted = onnx.encode_image(images, tasks, weights)  # one mixed call
        assert (prompted - ref.encode_image(images, tasks, weights)).abs().max() <= PARITY
        assert (prompted[0] - onnx.encode_image(images[:1])[0]).abs().max() > 1e-3  # the prompts act
        texts = ["a photo of a light red.", "dark red", "a cat"]
        assert (onnx.encode_text(texts) - ref.encode_text(texts)).abs().max() <= PARITY
        assert (onnx.encode_text(texts, "red#1", 0.3) - ref.encode_text(texts, "red#1", 0.3)).abs().max() <= PARITY
        names, templates = ["light red", "dark red"], ["a photo of a {}.", "a {} thing"]
        got = onnx.class_text(names, templates, task="green#1", weight=1.0)
        assert got.shape == (2, onnx.embed_dim)
        assert (got - ref.class_text(names, templates, task="green#1", weight=1.0)).abs().max() <= PARITY
        assert onnx.logit_scale() == pytest.approx(ref.logit_scale())
    finally:
        for rt in runtimes:
            rt.delete_task("red#1"), rt.delete_task("green#1")
    with pytest.raises(UnknownTask):
        onnx.encode_image(images[:1], ["red#1"], [1.0])


def test_a_task_larger_than_the_graphs_is_served_by_torch_and_logged(runtimes, task_maker, caplog):
    onnx, ref = runtimes
    big = make_color_task(task_maker, "blue", config=PromptConfig(depth=2, n_prefix=16), prompt_scale=0.5)
    with caplog.at_level("WARNING", logger="service.runtime_onnx"):
        load_both(runtimes, "blue#1", big)
    assert "task blue#1 does not fit the ONNX graphs (n_prefix 16 > 8): it is served by torch" in caplog.text
    load_both(runtimes, "red#2", make_color_task(task_maker, "red", prompt_scale=0.5))
    try:
        assert onnx.served_by_torch("blue#1") and not onnx.served_by_torch("red#2")
        images = color_batch(onnx, "blue", "red", "green", "blue")
        tasks, weights = ["blue#1", "red#2", None, "blue#1"], [1.0, 1.0, 0.0, 0.4]
        assert (onnx.encode_image(images, tasks, weights) - ref.encode_image(images, tasks, weights)).abs().max() <= PARITY
        texts = ["light blue", "dark blue"]
        assert (onnx.encode_text(texts, "blue#1", 1.0) - ref.encode_text(texts, "blue#1", 1.0)).abs().max() <= PARITY
    finally:
        for rt in runtimes:
            rt.delete_task("blue#1"), rt.delete_task("red#2")


def test_a_task_placed_in_the_last_blocks_runs_in_the_split_graphs(runtimes, task_maker):
    onnx, ref = runtimes
    top = make_color_task(task_maker, "green", config=PromptConfig(depth=1, n_prefix=4, placement="output"), prompt_scale=0.5)
    load_both(runtimes, "green#9", top)  # add-task's default placement, as deep as the top graphs (a third of 3 blocks)
    images = color_batch(onnx, "green", "red")
    tasks, weights = ["green#9", None], [1.0, 0.0]
    try:
        assert not onnx.images_by_torch() and not onnx.served_by_torch("green#9")
        # the frozen pass keeps the block the prompted pass resumes from, as torch's does
        frozen, resume = onnx.encode_frozen(images)
        assert isinstance(resume, _GraphResume) and resume.provisional
        assert resume.block == len(onnx.backbone.image_blocks) - 1
        exact = onnx.finish_frozen(resume)
        assert torch.equal(exact, onnx.encode_image(images))  # the frozen answer: bit for bit the frozen pass
        assert (exact - ref.encode_image(images)).abs().max() <= PARITY and (frozen - exact).abs().max() <= PARITY
        resumed = onnx.encode_image(images[:1], tasks[:1], weights[:1], resume=resume.rows([0]))
        want = ref.encode_image(images[:1], tasks[:1], weights[:1])
        assert (resumed - want).abs().max() <= PARITY and (want - exact[:1]).abs().max() > 1e-3  # the prompts act
        assert (onnx.encode_image(images, tasks, weights) - ref.encode_image(images, tasks, weights)).abs().max() <= PARITY
        names, templates = ["light green", "dark green"], ["a photo of a {}."]  # text prompts in the last blocks: torch
        got = onnx.class_text(names, templates, task="green#9")
        assert (got - ref.class_text(names, templates, task="green#9")).abs().max() <= PARITY
        assert (got - ref.class_text(names, templates)).abs().max() > 1e-3
    finally:
        for rt in runtimes:
            rt.delete_task("green#9")
    frozen, resume = onnx.encode_frozen(images)  # gone: the whole frozen graph again, exact and without a resume point
    assert resume is None and (frozen - ref.encode_image(images)).abs().max() <= PARITY


def test_a_graph_is_opened_when_a_task_first_needs_it(tiny_checkpoint, onnx_cache, task_maker):
    """A replica holds the weights of the graphs its tasks use: the frozen ones from the start, the split image graphs
    (instead of the whole frozen one) while a task placed in the last blocks is loaded, the whole prompted ones with
    the first task placed in the first blocks."""
    onnx = OnnxRuntime(load_backbone(TINY_JSON, tiny_checkpoint, "cpu"), cache_dir=onnx_cache)
    assert onnx.open_graphs() == ["image_frozen", "text_frozen"]
    top = make_color_task(task_maker, "green", config=PromptConfig(depth=1, n_prefix=4, placement="output"))
    onnx.load_task("green#6", top.prompts, PromptConfig.from_dict(top.recipe["prompts"]))
    # the split graphs give the frozen features now: the whole frozen image graph is closed while they do
    assert onnx.open_graphs() == sorted(["text_frozen", *TOP_GRAPHS])
    first = make_color_task(task_maker, "red", config=PromptConfig(depth=2, n_prefix=4))
    onnx.load_task("red#6", first.prompts, PromptConfig.from_dict(first.recipe["prompts"]))
    assert onnx.open_graphs() == sorted(["image_prompted", "text_frozen", "text_prompted", *TOP_GRAPHS])
    images = color_batch(onnx, "red", "green")
    frozen, resume = onnx.encode_frozen(images)
    assert torch.equal(onnx.finish_frozen(resume), onnx.encode_image(images))
    onnx.delete_task("green#6")  # the last task in the last blocks: the whole frozen graph again
    assert onnx.open_graphs() == sorted(GRAPHS + TOP_GRAPHS)
    assert onnx.encode_frozen(images)[1] is None


def test_a_task_deeper_than_the_top_graphs_sends_the_images_to_torch(runtimes, task_maker, caplog):
    onnx, ref = runtimes
    deep = make_color_task(task_maker, "green", config=PromptConfig(depth=2, n_prefix=4, placement="output"), prompt_scale=0.5)
    with caplog.at_level("WARNING", logger="service.runtime_onnx"):
        load_both(runtimes, "green#7", deep)
    assert "task green#7 does not fit the ONNX graphs (image depth 2 in the last blocks > 1): it is served by torch" in caplog.text
    images = color_batch(onnx, "green", "red")
    try:
        # images go through torch whole: its frozen pass keeps the block that task resumes from
        assert onnx.images_by_torch() and onnx.served_by_torch("green#7")
        frozen, resume = onnx.encode_frozen(images)
        assert not isinstance(resume, _GraphResume) and resume.block == len(onnx.backbone.image_blocks) - 2
        assert torch.equal(onnx.finish_frozen(resume), onnx.encode_image(images))
        resumed = onnx.encode_image(images[:1], ["green#7"], [1.0], resume=resume.rows([0]))
        assert (resumed - ref.encode_image(images[:1], ["green#7"], [1.0])).abs().max() <= PARITY
    finally:
        for rt in runtimes:
            rt.delete_task("green#7")
    assert not onnx.images_by_torch()


def test_engine_batches_auto_follows_where_the_images_run(runtimes, task_maker, monkeypatch):
    """`engine_batches` auto: two batches at once on a 2-core CPU while the image passes run in torch eager or in the
    prompted ONNX graphs, one while only the frozen graphs run; a number set is kept; a single core gets one."""
    from service.batching import engine_batches

    onnx, ref = runtimes
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert engine_batches(3, onnx) == 3 and engine_batches(None, ref)() == 2
    limit = engine_batches(None, onnx)
    assert limit() == 1  # no prompt task: the frozen graphs only
    top = make_color_task(task_maker, "green", config=PromptConfig(depth=1, n_prefix=4, placement="output"))
    load_both(runtimes, "green#8", top)
    try:
        assert limit() == 2 and not onnx.images_by_torch()  # add-task's default shape, in the split graphs
    finally:
        for rt in runtimes:
            rt.delete_task("green#8")
    deep = make_color_task(task_maker, "green", config=PromptConfig(depth=2, n_prefix=4, placement="output"))
    load_both(runtimes, "green#8", deep)
    try:
        assert limit() == 2  # asked per batch: the task the graphs cannot take sends the images to torch
    finally:
        for rt in runtimes:
            rt.delete_task("green#8")
    assert limit() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert engine_batches(None, ref) == 1


def summary(results):
    return [(r.task, r.version, [s.label for s in r.scores]) for r in results]


# output at depth 1: the split graphs; at depth 2 (deeper than they are): torch serves the images
@pytest.mark.parametrize("placement,depth", [("input", 2), ("output", 1), ("output", 2)])
def test_engine_with_runtime_onnx_classifies_like_runtime_torch(settings, store, task_maker, onnx_cache, placement, depth):
    config = PromptConfig(depth=depth, n_prefix=4, placement=placement)
    for i, name in enumerate(("red", "green", "blue")):
        store.publish(make_color_task(task_maker, name, seed=i, prompt_scale=0.2, config=config))
    engines = {
        rt: Engine.from_settings(settings.model_copy(update={"runtime": rt, "onnx_cache_dir": onnx_cache}))
        for rt in ("onnx", "torch")
    }
    try:
        assert type(engines["onnx"].runtime) is OnnxRuntime and type(engines["torch"].runtime) is TorchRuntime
        results = {}
        for rt, engine in engines.items():
            assert engine.sync() and set(engine.state.tasks) == {"red", "green", "blue"}
        assert engines["onnx"].runtime.images_by_torch() == (placement == "output" and depth == 2)
        for rt, engine in engines.items():
            pil = [Image.fromarray(color_sample(n, 1, seed=31 + i)[0]) for i, n in enumerate(["red", "blue", "yellow", "green", "red"])]
            images = [engine.preprocess(p) for p in pil]
            results[rt] = (engine.classify(images), engine.classify(images[:2], labels=["red", "blue", "cat"]))
        (auto_o, labels_o), (auto_t, labels_t) = results["onnx"], results["torch"]
        assert summary(auto_o) == summary(auto_t) and summary(labels_o) == summary(labels_t)
        assert [r.task for r in auto_o] == ["red", "blue", None, "green", "red"]
        for a, b in zip(auto_o + labels_o, auto_t + labels_t):
            assert a.gate == pytest.approx(b.gate, abs=PARITY)
            assert [s.score for s in a.scores] == pytest.approx([s.score for s in b.scores], abs=PARITY)
    finally:
        for engine in engines.values():
            engine.close()


def test_an_export_failure_falls_back_to_torch_and_says_why(settings, tmp_path, caplog):
    broken = settings.model_copy(update={"runtime": "onnx", "onnx_opset": 13, "onnx_cache_dir": str(tmp_path)})
    with caplog.at_level("ERROR", logger="service.runtime_onnx"):
        engine = Engine.from_settings(broken)
    assert type(engine.runtime) is TorchRuntime
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "serving with torch instead" in record.message and "OnnxExportError" in record.message
    assert "opset 13 failed at operator aten::scaled_dot_product_attention" in record.message
    assert list(tmp_path.iterdir()) == []  # nothing half-written left in the cache


def test_auto_measures_both_runtimes_and_keeps_the_faster(settings, onnx_cache, caplog):
    with caplog.at_level("INFO", logger="service.runtime_onnx"):
        engine = Engine.from_settings(settings.model_copy(update={"runtime": "auto", "onnx_cache_dir": onnx_cache}))
    m = re.search(r"runtime auto: .* onnx ([\d.]+) s, torch ([\d.]+) s -> (onnx|torch)", caplog.text)
    assert m, caplog.text
    onnx_s, torch_s, chosen = float(m[1]), float(m[2]), m[3]
    assert chosen == ("onnx" if onnx_s <= torch_s else "torch")
    assert type(engine.runtime) is (OnnxRuntime if chosen == "onnx" else TorchRuntime)


def test_runtime_settings(monkeypatch):
    assert ServiceSettings().runtime == "auto" and ServiceSettings().onnx_cache_dir is None
    monkeypatch.setenv("KEEPCLIP_RUNTIME", "onnx")
    monkeypatch.setenv("KEEPCLIP_ONNX_CACHE_DIR", "/tmp/graphs")
    assert ServiceSettings().runtime == "onnx" and ServiceSettings().onnx_cache_dir == "/tmp/graphs"
    with pytest.raises(ValidationError):
        ServiceSettings(runtime="tensorrt")


def test_the_onnx_engine_serves_head_tasks_like_the_torch_engine(runtimes, task_maker, store, settings):
    """Kinds are runtime-agnostic: a head task answers from the ONNX frozen pass as it does from torch's."""
    from tests.unit.service.test_kinds import make_head_task

    store.publish(make_head_task(task_maker, "red"))
    onnx, ref = runtimes
    engines = [Engine(rt, store, settings) for rt in (onnx, ref)]
    try:
        for engine in engines:
            engine.sync()
        images = [onnx.preprocess(Image.fromarray(color_sample(n, 1, seed=3 + i)[0])) for i, n in enumerate(("red", "blue", "red"))]
        by_onnx, by_torch = (e.classify(images) for e in engines)
        assert [r.task for r in by_onnx] == [r.task for r in by_torch] == ["red", None, "red"]
        for a, b in zip(by_onnx, by_torch):
            assert a.gate == pytest.approx(b.gate, abs=1e-3)
            assert [s.label for s in a.scores] == [s.label for s in b.scores]
            assert [s.logit for s in a.scores] == pytest.approx([s.logit for s in b.scores], abs=1e-2)
    finally:
        for engine in engines:
            engine.close()
