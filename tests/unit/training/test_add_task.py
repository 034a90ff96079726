"""add-task end to end on the tiny config: it publishes an artifact that the service can load and that classifies
its own validation images; earlier tasks and the backbone stay untouched; the command line reads well."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from backbone import DEFAULT_TEMPLATES, PixelPipeline, PromptConfig, PromptedCLIP, TaskStats, text_classifier
from backbone.prompts import default_depth
from prompts_store import TaskArtifact, open_store
from tests.conftest import REPO, tiny_backbone
from tests.unit.training.helpers import CLASS_NAMES, TINY_MODEL, colour_images, tiny_args, write_npz
from training.add_task import build_parser
from training.data import split_train_val
from training.learner import ResidualPromptLearner, TaskData
from training.data import ImageSet
from training.settings import ResidualPromptSettings


def test_add_task_publishes_an_artifact_that_classifies_its_own_validation_images(paths, add_task):
    data = write_npz(paths.root / "colours.npz", per_class=24)
    run = add_task(tiny_args("colours", data, paths.store, paths.checkpoints, "--class-names", ",".join(CLASS_NAMES), epochs=12))
    assert run.code == 0, run.err
    assert "published task 'colours' version 1" in run.out

    backbone = tiny_backbone()  # the same random init as --pretrained none
    artifact = open_store(paths.store).get("colours", backbone=backbone.fingerprint.to_dict())
    assert artifact.kind == "residual-prompts" and artifact.class_names == CLASS_NAMES
    assert artifact.templates == list(DEFAULT_TEMPLATES)  # the default, recorded
    recipe, metrics = artifact.recipe, artifact.metrics
    assert recipe["prompts"] == PromptConfig(depth=1, n_prefix=8, placement="output").to_dict()  # a third of 3 blocks
    assert recipe["optimizer"] == {"name": "sgd", "lr": 5.0, "lr_reference_logit_scale": 100.0, "momentum": 0.0, "weight_decay": 0.0}
    assert metrics["peak_lr_applied"] == pytest.approx(5.0 * 100 / backbone_logit_scale())
    assert recipe["schedule"]["name"] == "cosine" and recipe["epochs"] == 12 and recipe["batch_size"] == 16
    assert recipe["split"] == {"val_fraction": 0.25, "seed": 0, "stratified": True, "n_train": 72, "n_val": 24}
    assert {"val_accuracy", "val_zero_shot_accuracy", "best_epoch", "train_seconds", "n_train", "history"} <= set(metrics)
    assert len(metrics["history"]) == 12 and 1 <= metrics["best_epoch"] <= 12

    # the service's way to load it: prompts + config from the recipe, fingerprint, text classifier
    model = PromptedCLIP(backbone)
    model.load_task(artifact.name, artifact.prompts, PromptConfig.from_dict(artifact.recipe["prompts"]))
    stats = TaskStats.from_tensors(artifact.stats)
    classifier = text_classifier(model, artifact.class_names, artifact.templates, task=artifact.name)
    images, labels = colour_images(24)
    _, val = split_train_val(labels, 0.25, seed=0)
    batch = PixelPipeline(backbone.preprocess).to_batch(np.stack([PixelPipeline(backbone.preprocess).pixels(_pil(im)) for im in images[val]]))
    with torch.no_grad():
        features = model.encode_image(batch, tasks="colours", normalize=True)
        frozen = model.encode_image(batch, normalize=True)
    accuracy = ((features @ classifier.T).argmax(-1).numpy() == labels[val]).mean()
    assert accuracy >= 0.75, f"accuracy {accuracy} on 4 classes (chance 0.25)"
    assert abs(accuracy - metrics["val_accuracy"]) < 1e-6
    assert stats.n_images == 96 and stats.keys.shape[0] == 4
    assert (stats.weight(frozen) > 0.5).float().mean() > 0.9  # its own images pass its own gate


def test_earlier_tasks_and_the_backbone_are_untouched(paths, add_task):
    data = write_npz(paths.root / "colours.npz", per_class=8, classnames_beside=True)
    assert add_task(tiny_args("earlier", data, paths.store, paths.checkpoints, epochs=1)).code == 0
    store = open_store(paths.store)
    before = store.get("earlier")
    files = {p: p.read_bytes() for p in (paths.store / "tasks" / "earlier").rglob("*") if p.is_file()}

    assert add_task(tiny_args("later", data, paths.store, paths.checkpoints, "--seed", "1", epochs=1)).code == 0
    after = store.get("earlier")
    assert [t.name for t in store.list()] == ["earlier", "later"]
    assert after.version == before.version == 1 and after.checksums == before.checksums
    assert {p: p.read_bytes() for p in (paths.store / "tasks" / "earlier").rglob("*") if p.is_file()} == files

    # the learner changes no backbone tensor (prompts excluded), in the very model it trained on
    backbone = tiny_backbone()
    frozen_hash = PromptedCLIP(backbone).frozen_state_sha256()
    images, labels = colour_images(4)
    pixels = np.stack([PixelPipeline(backbone.preprocess).pixels(_pil(im)) for im in images])
    task = TaskData("third", CLASS_NAMES, list(DEFAULT_TEMPLATES), ImageSet(pixels, labels))
    artifact = ResidualPromptLearner(ResidualPromptSettings(epochs=1, batch_size=8, val_fraction=0)).fit(task, backbone)
    assert isinstance(artifact, TaskArtifact) and artifact.backbone == backbone.fingerprint.to_dict()
    assert artifact.recipe["prompts"]["depth"] == 1  # the default: a third of the tiny tower's 3 blocks
    assert PromptedCLIP(backbone).frozen_state_sha256() == frozen_hash
    assert all(not p.requires_grad for p in backbone.model.parameters())


def test_other_layouts_class_names_and_templates_end_to_end(paths, add_task):
    from tests.unit.training.helpers import write_folder

    folder = write_folder(paths.root / "folder", per_class=5)
    templates = paths.root / "templates.txt"
    templates.write_text("a photo of a {}.\na {} colour.\n")
    test = write_npz(paths.root / "test" / "test.npz", per_class=3, seed=1, classnames_beside=True)
    run = add_task(tiny_args("folder-task", folder, paths.store, paths.checkpoints, "--templates", templates,
                             "--test", test, "--text-templates", "sample", epochs=1))
    assert run.code == 0, run.err
    artifact = open_store(paths.store).get("folder-task")
    assert artifact.class_names == sorted(CLASS_NAMES)  # folder names, sorted
    assert artifact.templates == ["a photo of a {}.", "a {} colour."]
    assert artifact.metrics["n_test"] == 12 and artifact.metrics["test_accuracy"] is not None
    assert artifact.metrics["test_zero_shot_accuracy"] is not None and "test accuracy" in run.out
    assert artifact.recipe["data"]["train"]["format"] == "folder"
    recall = artifact.metrics["recall_per_class"]  # 3 test images per class: their mean is the accuracy
    assert list(recall["test"]) == sorted(CLASS_NAMES) and list(recall["val"]) == sorted(CLASS_NAMES)
    assert np.mean(list(recall["test"].values())) == pytest.approx(artifact.metrics["test_accuracy"])
    assert "weakest classes on test: " in run.out


def test_help_reads_well_under_both_names_and_imports_no_torch(add_task):
    assert build_parser("keepclip add-task").format_usage().startswith("usage: keepclip add-task")
    run = add_task(["--help"])
    assert run.code == 0 and "--workers N" in run.out and "KEEPCLIP_STORE" in run.out
    probe = (
        "import sys, training.add_task as a; a.build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "training.add_task", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert help_text.startswith("usage: python -m training.add_task")


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("KEEPCLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("KEEPCLIP_STORE", "/somewhere/store")
    args = build_parser().parse_args(["x", "--data", "d"])
    assert args.model == TINY_MODEL and args.store == "/somewhere/store"
    assert (args.epochs, args.lr, args.batch_size, args.depth, args.n_prefix, args.prompt_placement) == (10, 5.0, 128, None, 8, "output")
    assert build_parser().parse_args(["x", "--data", "d", "--depth", "none"]).depth is None


def test_the_default_depth_is_a_third_of_the_image_tower():
    assert [default_depth(blocks) for blocks in (1, 3, 6, 12, 24, 32)] == [1, 1, 2, 4, 8, 11]
    assert ResidualPromptSettings().for_tower(12).depth == 4 and ResidualPromptSettings(depth=5).for_tower(12).depth == 5
    with pytest.raises(ValueError, match="resolve it first"):
        ResidualPromptSettings().prompt_shape()


def backbone_logit_scale() -> float:
    return float(tiny_backbone().model.logit_scale.exp())


def _pil(array):
    from PIL import Image

    return Image.fromarray(array)


def test_keepclip_add_task_is_the_same_command(tmp_path):
    """`keepclip add-task` hands its arguments to training.add_task unchanged: same help, same errors and exit codes."""
    from typer.testing import CliRunner

    from clients.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["add-task", "--help"])
    assert shown.exit_code == 0 and "usage: keepclip add-task" in shown.output and "--workers N" in shown.output
    missing = runner.invoke(app, ["add-task", "digits", "--data", str(tmp_path / "nope.npz"), "--store", str(tmp_path / "s")])
    assert missing.exit_code == 2
    assert f"--data {tmp_path / 'nope.npz'}: no such file or directory" in missing.output
    assert not (tmp_path / "s").exists()


class _RecordingRay:
    """Stands in for the `ray` module where only the arguments of ray.init matter (no cluster is started)."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(kwargs)


@pytest.mark.parametrize("given, env, pinned", [
    (None, "10.0.0.5:6379", "10.0.0.5:6379"),  # `ray job submit` sets RAY_ADDRESS to the cluster's GCS address
    ("10.0.0.7:6390", None, "10.0.0.7:6390"),  # --address wins
    ("auto", None, None),  # not an address: Ray resolves it
    (None, None, None),  # a new local Ray
    ("ray://head:10001", None, None),  # Ray Client: its workers know their cluster
])
def test_ray_train_actors_get_the_jobs_own_cluster_address(monkeypatch, given, env, pinned):
    from training.add_task import _connect_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    ray = _RecordingRay()
    _connect_ray(ray, given)
    (call,) = ray.calls
    assert call["address"] == (given or env)
    assert call["runtime_env"] == (None if pinned is None else {"env_vars": {"RAY_ADDRESS": pinned}})


def test_prompts_placed_in_the_last_blocks_train_there_and_say_so_in_the_recipe(paths, add_task):
    data = write_npz(paths.root / "colours.npz", per_class=8, classnames_beside=True)
    run = add_task(tiny_args("top", data, paths.store, paths.checkpoints, "--depth", "1", "--prompt-placement", "output", epochs=1))
    assert run.code == 0, run.err
    artifact = open_store(paths.store).get("top")
    assert artifact.recipe["prompts"]["placement"] == "output"
    assert sorted(artifact.prompts) == ["text.2.key", "text.2.value", "visual.2.key", "visual.2.value"]  # 3-block towers
    assert artifact.prompts["visual.2.value"].abs().sum() > 0  # trained (P_V starts at zero)
    bad = add_task(tiny_args("top", data, paths.store, paths.checkpoints, "--prompt-placement", "middle"))
    assert bad.code == 2 and "--prompt-placement" in bad.err
