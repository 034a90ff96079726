"""The closed-form head: `add-task` with the default kind learns in one frozen pass, `--update` adds images and
classes in closed form (equal to fitting on all the data at once), and bad input is refused by name, exit 2, with
nothing published."""
import numpy as np
import pytest
import torch

from backbone import DEFAULT_TEMPLATES, PixelPipeline
from prompts_store import TaskArtifact, open_store
from tests.conftest import tiny_backbone
from tests.unit.training.helpers import CLASS_NAMES, colour_images, tiny_args
from training.data import ImageSet, split_train_val
from training.head_learner import Features, HeadLearner, check_features, fit_head, merge_class_names, ridge_path
from training.errors import InputError
from training.learner import RunContext, TaskData
from training.settings import HeadSettings

SETTINGS = HeadSettings(width=512, val_fraction=0.25)


def write(path, images, labels, names):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)
    (path.parent / "classnames.json").write_text(__import__("json").dumps(names))
    return path


def head_args(name, data, paths, *extra):
    return tiny_args(name, data, paths.store, paths.checkpoints, "--head-width", "512", *extra, kind="head")


def test_the_default_kind_is_a_head_learned_in_one_frozen_pass(paths, add_task):
    images, labels = colour_images(per_class=12)
    data = write(paths.root / "a" / "train.npz", images, labels, CLASS_NAMES)
    test = write(paths.root / "t" / "test.npz", *colour_images(per_class=6, seed=3), CLASS_NAMES)
    argv = [a for a in head_args("colours", data, paths, "--test", str(test)) if a not in ("--kind", "head")]
    run = add_task(argv)  # no --kind: the default
    assert run.code == 0, run.err
    assert "head λ" in run.out and "test accuracy" in run.out
    artifact = open_store(paths.store).get("colours", with_update_state=True)
    assert artifact.kind == "head"
    m = artifact.metrics
    assert {"test_accuracy", "test_zero_shot_accuracy", "val_accuracy", "lambda", "fusion"} <= set(m)
    assert m["val_accuracy"] >= 0.9 and m["test_accuracy"] >= 0.9  # noisy solid colours: easy for a head
    assert sorted(m["recall_per_class"]["val"]) == sorted(m["recall_per_class"]["test"]) == sorted(CLASS_NAMES)
    assert "weakest classes on test: " in run.out
    assert set(artifact.prompts) == {"head.weights", "head.center"} and artifact.prompts["head.weights"].shape == (512 + 32, 4)  # random features + the feature itself
    assert artifact.update_state["train.features"].shape[0] + artifact.update_state["val.features"].shape[0] == 48


def test_update_adds_images_and_a_class_and_equals_a_fit_on_all_the_data(paths, add_task):
    first, first_labels = colour_images(per_class=8, seed=1)
    keep = first_labels < 3  # the first version knows red, green, blue
    data_a = write(paths.root / "a" / "train.npz", first[keep], first_labels[keep], CLASS_NAMES[:3])
    assert add_task(head_args("colours", data_a, paths)).code == 0
    more, more_labels = colour_images(per_class=8, seed=2)
    # the update's own label order differs: yellow first, then blue (known) and red (known)
    order = ["yellow", "blue", "red"]
    picked = np.isin(more_labels, [CLASS_NAMES.index(n) for n in order])
    relabelled = np.array([order.index(CLASS_NAMES[x]) for x in more_labels[picked]])
    data_b = write(paths.root / "b" / "train.npz", more[picked], relabelled, order)
    run = add_task(head_args("colours", data_b, paths, "--update"))
    assert run.code == 0, run.err
    store = open_store(paths.store)
    v2 = store.get("colours", with_update_state=True)
    assert v2.version == 2 and v2.class_names == ["red", "green", "blue", "yellow"] and v2.metrics["updated_from_version"] == 1

    # all the images at once, split the same way, fitted by the same learner
    backbone = tiny_backbone()
    pipeline = PixelPipeline(backbone.preprocess)
    sets = []
    for images, labels in ((first[keep], first_labels[keep]), (more[picked], np.array([["red", "green", "blue", "yellow"].index(order[x]) for x in relabelled]))):
        pixels = np.stack([pipeline.pixels(__import__("PIL.Image").Image.fromarray(im)) for im in images])
        train, val = split_train_val(labels, 0.25, 0)
        sets.append((ImageSet(pixels[train], labels[train]), ImageSet(pixels[val], labels[val])))
    task = TaskData("colours", ["red", "green", "blue", "yellow"], list(DEFAULT_TEMPLATES),
                    ImageSet.concat(sets[0][0], sets[1][0]), ImageSet.concat(sets[0][1], sets[1][1]))
    once = HeadLearner(SETTINGS).fit(task, backbone, RunContext(progress=False))
    for key in ("head.weights", "head.center"):
        assert torch.allclose(v2.prompts[key], once.prompts[key], atol=1e-5), key
    for key in ("mean", "whitener_tril", "keys", "gate"):
        assert torch.allclose(v2.stats[key].double(), once.stats[key].double(), atol=1e-5), key
    assert v2.recipe["head"]["fusion"] == once.recipe["head"]["fusion"]


def test_an_update_from_an_npz_with_string_labels_finds_the_known_classes(paths, add_task):
    images, labels = colour_images(per_class=6, seed=1)
    data_a = write(paths.root / "a" / "train.npz", images[labels < 3], labels[labels < 3], CLASS_NAMES[:3])
    assert add_task(head_args("colours", data_a, paths)).code == 0
    more, more_labels = colour_images(per_class=6, seed=2)
    (paths.root / "b").mkdir()
    np.savez(paths.root / "b" / "train.npz", images=more, labels=np.array(CLASS_NAMES)[more_labels])  # no class names
    run = add_task(head_args("colours", paths.root / "b" / "train.npz", paths, "--update"))
    assert run.code == 0, run.err
    assert open_store(paths.store).get("colours").class_names == ["red", "green", "blue", "yellow"]


def test_an_update_counts_images_the_task_already_learned_once(paths, add_task):
    """The usual update: the same folder again, a few images added. Only the new ones count; re-sending all of it is
    refused (nothing to add); the same image under another class is kept and reported."""
    images, labels = colour_images(per_class=8, seed=1)
    first = write(paths.root / "a" / "train.npz", images, labels, CLASS_NAMES)
    assert add_task(head_args("colours", first, paths)).code == 0
    more, more_labels = colour_images(per_class=3, seed=2)
    grown = write(paths.root / "b" / "train.npz", np.concatenate([images, more]), np.concatenate([labels, more_labels]), CLASS_NAMES)
    only_new = write(paths.root / "c" / "train.npz", more, more_labels, CLASS_NAMES)
    run = add_task(head_args("colours", grown, paths, "--update"))
    assert run.code == 0, run.err
    assert "32 of 44 images are already in version 1 with the same class; counted once" in run.out + run.err
    store = open_store(paths.store)
    from_grown = store.get("colours", with_update_state=True)
    store.rollback("colours", 1)
    assert add_task(head_args("colours", only_new, paths, "--update")).code == 0
    from_new = store.get("colours", with_update_state=True)
    def learned(artifact):  # every image's features and class, in one order (the two splits differ)
        state = artifact.update_state
        rows = torch.cat([torch.cat([state[f"{s}.features"], state[f"{s}.labels"][:, None].float()], 1) for s in ("train", "val")])
        return rows[torch.argsort(rows[:, 0])]

    assert len(learned(from_grown)) == len(learned(from_new)) == 44
    assert torch.allclose(learned(from_grown), learned(from_new), atol=1e-5)

    before = store.generation()
    again = add_task(head_args("colours", grown, paths, "--update"))
    assert again.code == 2 and "all 44 images are already in version" in again.err and "nothing to add" in again.err, again.err
    assert store.generation() == before
    swapped = write(paths.root / "d" / "train.npz", more, (more_labels + 1) % 4, CLASS_NAMES)  # the same images, other classes
    relabelled = add_task(head_args("colours", swapped, paths, "--update", "--force"))  # a worse head, on purpose
    assert relabelled.code == 0 and "12 images are already in version" in relabelled.out + relabelled.err
    assert "kept under both" in relabelled.out + relabelled.err


@pytest.mark.parametrize("case", ["unknown task", "other kind", "one image per class", "conflicting name"])
def test_bad_updates_and_small_classes_are_refused_by_name_and_nothing_is_published(paths, add_task, case):
    images, labels = colour_images(per_class=6)
    data = write(paths.root / "a" / "train.npz", images, labels, CLASS_NAMES)
    if case == "other kind":
        assert add_task(tiny_args("colours", data, paths.store, paths.checkpoints, epochs=1)).code == 0
    elif case != "unknown task":
        assert add_task(head_args("colours", data, paths)).code == 0
    before = open_store(paths.store).generation()
    if case == "one image per class":
        one = np.concatenate([np.flatnonzero(labels == c)[:1 if c == 2 else 3] for c in range(4)])
        bad = write(paths.root / "b" / "train.npz", images[one], labels[one], CLASS_NAMES)
        run, expected = add_task(head_args("other", bad, paths)), "class 'blue' has 1 image(s)"
    elif case == "conflicting name":
        bad = write(paths.root / "b" / "train.npz", images, labels, ["Red", "green", "blue", "yellow"])
        run, expected = add_task(head_args("colours", bad, paths, "--update")), "'Red' conflicts with the task's class 'red'"
    else:
        run = add_task(head_args("colours", data, paths, "--update"))
        expected = "no live task 'colours'" if case == "unknown task" else "of kind 'residual-prompts'; only 'head' tasks"
    assert run.code == 2 and expected in run.err, run.err
    assert "Traceback" not in run.err
    assert open_store(paths.store).generation() == before


def test_a_feature_width_mismatch_and_non_finite_features_are_refused(paths, add_task):
    images, labels = colour_images(per_class=6)
    data = write(paths.root / "a" / "train.npz", images, labels, CLASS_NAMES)
    assert add_task(head_args("colours", data, paths)).code == 0
    store = open_store(paths.store)
    live = store.get("colours", with_update_state=True)
    narrow = {k: (v[:, :16] if k.endswith("features") else v) for k, v in live.update_state.items()}
    store.publish(TaskArtifact(name="colours", kind="head", class_names=live.class_names, backbone=live.backbone,
                               templates=live.templates, recipe=live.recipe, prompts=live.prompts, stats=live.stats,
                               update_state=narrow))
    before = store.generation()
    run = add_task(head_args("colours", data, paths, "--update"))
    assert run.code == 2 and "kept 16-d features" in run.err and "feature-width mismatch" in run.err
    assert store.generation() == before
    with pytest.raises(InputError, match="--data: the frozen features of 1 images are not finite"):
        check_features(Features(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 1])), "--data")


def test_a_one_class_task_is_learned_with_a_warning_that_only_its_fingerprint_decides(paths, add_task):
    images, labels = colour_images(per_class=6)
    data = write(paths.root / "a" / "train.npz", images[labels == 0], labels[labels == 0], CLASS_NAMES[:1])
    run = add_task(head_args("reds", data, paths))
    assert run.code == 0, run.err
    assert "task reds has one class ('red'): every image routed to it gets that answer" in run.err
    assert "  1 class; " in run.out


def test_recall_per_class_counts_each_class_on_its_own_images():
    from training.head_learner import recall_per_class

    truth, predicted = np.array([0, 0, 0, 0, 1, 1, 3]), np.array([0, 0, 0, 1, 1, 0, 3])
    assert recall_per_class(predicted, truth, 4) == [0.75, 0.5, None, 1.0]


def test_merge_keeps_known_labels_and_appends_new_classes():
    assert merge_class_names(["a", "b"], ["c", "a"], "--data x") == (["a", "b", "c"], [2, 0])
    # a class spelt with '_' for spaces is the same class (a task learnt from a manifest before labels were read
    # like folder names); case or spaces that differ are refused, since the text encoder would see two classes
    assert merge_class_names(["sea_lion", "b"], ["sea lion", "c"], "--data x") == (["sea_lion", "b", "c"], [0, 2])
    assert merge_class_names(["sea lion"], ["sea_lion"], "--data x") == (["sea lion"], [0])
    with pytest.raises(InputError, match="'Sea_lion' conflicts with the task's class 'sea lion'"):
        merge_class_names(["sea lion"], ["Sea_lion"], "--data x")


def test_leave_one_out_scores_equal_refitting_without_each_image():
    torch.manual_seed(0)
    for n, width in ((12, 30), (40, 10)):  # the dual and the primal solve
        phi, targets = torch.randn(n, width).double(), torch.nn.functional.one_hot(torch.arange(n) % 3, 3).double()
        [(held_out, weights)] = list(ridge_path(phi, targets, (0.5,)))
        s = phi.square().sum().item() / n
        for i in (0, n - 1):
            rest = torch.arange(n) != i
            w = torch.linalg.solve(phi[rest].T @ phi[rest] + 0.5 * s * torch.eye(width, dtype=torch.float64), phi[rest].T @ targets[rest])
            assert torch.allclose(held_out[i], phi[i] @ w, atol=1e-8)
        full = torch.linalg.solve(phi.T @ phi + 0.5 * s * torch.eye(width, dtype=torch.float64), phi.T @ targets)
        assert torch.allclose(weights, full, atol=1e-8)


def test_weighted_leave_one_out_scores_equal_refitting_without_each_image():
    """--balance-classes scales each row by √weight: the scores, divided by it, are a weighted fit's without image i."""
    torch.manual_seed(1)
    for n, width in ((12, 30), (40, 10)):
        phi, targets = torch.randn(n, width).double(), torch.nn.functional.one_hot(torch.arange(n) % 3, 3).double()
        root = torch.rand(n, 1, dtype=torch.float64) + 0.5
        [(held_out, weights)] = list(ridge_path(phi * root, targets * root, (0.5,)))
        s = (phi * root).square().sum().item() / n
        for i in (0, n - 1):
            rest = torch.arange(n) != i
            wp = phi[rest] * root[rest].square()
            w = torch.linalg.solve(wp.T @ phi[rest] + 0.5 * s * torch.eye(width, dtype=torch.float64), wp.T @ targets[rest])
            assert torch.allclose(held_out[i] / root[i], phi[i] @ w, atol=1e-8)


def clusters(counts: list[int], seed: int, dim: int = 24) -> Features:
    """Unit features of overlapping Gaussian classes, `counts[c]` of class c."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), dim, generator=torch.Generator().manual_seed(0))
    feats = torch.cat([centres[c] + 2.2 * torch.randn(n, dim, generator=g) for c, n in enumerate(counts)])
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return Features(torch.nn.functional.normalize(feats, dim=-1), labels)


def test_balanced_classes_raise_the_rare_classes_recall_and_change_nothing_on_even_data():
    text = torch.nn.functional.normalize(torch.randn(4, 24, generator=torch.Generator().manual_seed(5)), dim=-1)
    train, val, test = clusters([300, 12, 12, 12], 1), clusters([30, 4, 4, 4], 2), clusters([200] * 4, 3)
    recall = {}
    for balanced in (False, True):
        fit = fit_head(train, val, text, 10.0, HeadSettings(width=256, balance_classes=balanced), 4)
        predicted = fit.head.logits(test.features, 10.0 * test.features @ text.T, torch.ones(len(test))).argmax(-1)
        recall[balanced] = [float((predicted[test.labels == c] == c).float().mean()) for c in range(4)]
    rare = {b: sum(r[1:]) / 3 for b, r in recall.items()}
    assert rare[True] > rare[False] + 0.1, recall  # the even test set: the rare classes gain
    assert sum(recall[True]) > sum(recall[False]), recall  # and so does the mean per-class recall
    even = clusters([40] * 4, 4), clusters([8] * 4, 6)  # every class as large: the weights are all 1, the head the same
    plain, weighed = (fit_head(*even, text, 10.0, HeadSettings(width=256, balance_classes=b), 4) for b in (False, True))
    assert (plain.lam, plain.head.fusion, plain.val_accuracy) == (weighed.lam, weighed.head.fusion, weighed.val_accuracy)
    assert torch.equal(plain.head.weights, weighed.head.weights)


def test_balance_classes_reports_the_mean_per_class_recall_and_an_update_keeps_it(paths, add_task):
    images, labels = colour_images(per_class=20)
    keep = (labels == 0) | (np.arange(len(labels)) % 20 < 4)  # red 20 images, the other colours 4 each
    data = write(paths.root / "a" / "train.npz", images[keep], labels[keep], CLASS_NAMES)
    hint = "classes are uneven ('red': 20 images, 'green': 4): the head follows these proportions"
    assert hint in add_task(head_args("plain", data, paths)).err  # without the option: a hint names it
    run = add_task(head_args("colours", data, paths, "--balance-classes"))
    assert hint not in run.err
    assert run.code == 0, run.err
    assert "val mean per-class recall" in run.out, run.out
    store = open_store(paths.store)
    first = store.get("colours")
    assert first.metrics["accuracy_measure"] == "mean per-class recall" and first.recipe["head_settings"]["balance_classes"]
    more = write(paths.root / "b" / "train.npz", *colour_images(per_class=3, seed=7), CLASS_NAMES)
    assert add_task(head_args("colours", more, paths, "--update")).code == 0  # no flag: the live version's choice
    assert store.get("colours").recipe["head_settings"]["balance_classes"] is True
    run = add_task(head_args("colours", write(paths.root / "c" / "train.npz", *colour_images(per_class=3, seed=8), CLASS_NAMES),
                             paths, "--update", "--no-balance-classes"))
    assert run.code == 0, run.err
    latest = store.get("colours")
    assert latest.version == 3 and latest.metrics["accuracy_measure"] == "accuracy" and "val accuracy" in run.out
    for kind, why in (("prompts", "has no head"), ("auto", "compares its candidates by plain accuracy")):
        run = add_task(tiny_args("other", data, paths.store, paths.checkpoints, "--balance-classes", kind=kind))
        assert run.code == 2 and "--balance-classes weighs the classes in the head's solve" in run.err and why in run.err


def test_auto_keeps_the_best_candidate_on_validation_and_records_every_figure(paths, add_task):
    images, labels = colour_images(per_class=12)
    data = write(paths.root / "a" / "train.npz", images, labels, CLASS_NAMES)
    run = add_task(head_args("colours", data, paths, "--kind", "auto"))
    assert run.code == 0, run.err
    assert "auto, validation accuracy: head" in run.out
    artifact = open_store(paths.store).get("colours")
    candidates = artifact.metrics["candidates"]
    order = artifact.recipe["auto"]["candidates"]  # cheapest to serve first
    assert order == ["head", "residual-prompts", "prompts+head"] and set(candidates) == set(order)
    best = max(order, key=lambda k: candidates[k]["val_accuracy"])  # the first of equals: the cheapest to serve
    assert artifact.kind == best and artifact.metrics["val_accuracy"] == candidates[best]["val_accuracy"]
    assert artifact.recipe["auto"]["chosen"] == best


def test_prompts_plus_head_is_served_with_its_prompted_pass(paths, add_task):
    from service.kinds import load_kind
    from service.runtime import TorchRuntime

    images, labels = colour_images(per_class=12)
    data = write(paths.root / "a" / "train.npz", images, labels, CLASS_NAMES)
    assert add_task(head_args("colours", data, paths, "--kind", "prompts+head")).code == 0
    artifact = open_store(paths.store).get("colours")
    assert artifact.kind == "prompts+head" and "head.weights" in artifact.prompts and "visual.2.key" in artifact.prompts
    assert {"val_accuracy", "prompts", "fusion"} <= set(artifact.metrics)
    runtime = TorchRuntime(tiny_backbone())
    served = load_kind(artifact, runtime, "slot")
    assert served.slot == "slot" and served.stats is not None
    pipeline = PixelPipeline(runtime.backbone.preprocess)
    batch = pipeline.to_batch(np.stack([pipeline.pixels(__import__("PIL.Image").Image.fromarray(im)) for im in images[::6]]))
    frozen = runtime.encode_image(batch)
    prompted = runtime.encode_image(batch, ["slot"] * len(batch), [1.0] * len(batch))
    logits = served.logits(prompted, frozen, torch.ones(len(batch)))
    assert logits.shape == (len(batch), 4)
    assert (logits.argmax(-1).numpy() == labels[::6]).mean() >= 0.75


def test_the_part_a_replica_loads_of_a_10_class_head_at_512_d_stays_under_1_mib():
    from backbone import fit_task_stats
    from prompts_store.artifact import encode_tensors
    from training.head_learner import fit_head

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    features = torch.nn.functional.normalize(torch.randn(10, 512, generator=gen)[labels] + torch.randn(200, 512, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(10, 512, generator=gen), dim=-1)
    val = torch.arange(200) % 5 == 0
    fit = fit_head(Features(features[~val], labels[~val]), Features(features[val], labels[val]), text, 100.0, HeadSettings(), 10)
    prompts = encode_tensors(fit.head.to_tensors(), task="t", file="prompts.safetensors")
    stats = encode_tensors(fit_task_stats(features, labels).to_tensors(), task="t", file="stats.safetensors")
    assert fit.head.weights.shape == (4096 + 512, 10)
    assert len(prompts) + len(stats) <= 1024 * 1024, (len(prompts), len(stats))


def test_a_worse_version_is_refused_with_both_figures_unless_forced(paths, add_task):
    images, labels = colour_images(per_class=12)
    data = write(paths.root / "a" / "train.npz", images, labels, CLASS_NAMES)
    assert add_task(head_args("colours", data, paths)).code == 0  # the head: 100 % on validation
    store = open_store(paths.store)
    live_val = store.get("colours").metrics["val_accuracy"]
    worse = tiny_args("colours", data, paths.store, paths.checkpoints, "--lr", "1e-6", epochs=1)  # prompts, barely trained
    run = add_task(worse)
    assert run.code == 2 and "not published" in run.err and f"live version 1's {100 * live_val:.1f}%" in run.err, run.err
    assert store.get("colours").version == 1 and store.generation() == 1
    run = add_task([*worse, "--force", "--run-name", "forced"])
    assert run.code == 0, run.err
    assert store.get("colours").version == 2 and store.get("colours").kind == "residual-prompts"


def test_check_publishable_refuses_below_zero_shot_and_below_the_live_version():
    from training.publish_check import check_publishable

    with pytest.raises(InputError, match=r"40.0% is below frozen zero-shot's 50.0%"):
        check_publishable({"val_accuracy": 0.4, "val_zero_shot_accuracy": 0.5}, None, force=False)
    with pytest.raises(InputError, match=r"60.0% is below the live version 3's 70.0%"):
        check_publishable({"val_accuracy": 0.6, "val_zero_shot_accuracy": 0.5}, {"version": 3, "val_accuracy": 0.7}, force=False)
    check_publishable({"val_accuracy": 0.4, "val_zero_shot_accuracy": 0.5}, {"version": 3, "val_accuracy": 0.7}, force=True)
    check_publishable({"val_accuracy": 0.7, "val_zero_shot_accuracy": 0.5}, {"version": 3, "val_accuracy": 0.7}, force=False)
    balanced = {"val_accuracy": 0.6, "val_zero_shot_accuracy": 0.5, "accuracy_measure": "mean per-class recall"}
    with pytest.raises(InputError, match=r"validation mean per-class recall 60.0% is below the live version 3's 70.0%"):
        check_publishable(balanced, {"version": 3, "val_accuracy": 0.7, "accuracy_measure": "mean per-class recall"}, force=False)
    check_publishable(balanced, {"version": 3, "val_accuracy": 0.7}, force=False)  # another measure: not compared


def test_the_eval_batch_follows_the_device_and_does_not_change_the_features():
    """On CPU big batches run slower (their activations outgrow the caches): 16 there, 256 on GPU, unless set."""
    from backbone import PromptedCLIP
    from training.features import eval_batch, sharded_features

    assert (eval_batch(None, "cpu"), eval_batch(None, "cuda"), eval_batch(7, "cpu")) == (16, 256, 7)
    backbone = tiny_backbone()
    pipeline = PixelPipeline(backbone.preprocess)
    images, labels = colour_images(per_class=10)
    pixels = ImageSet(np.stack([pipeline.pixels(__import__("PIL.Image").Image.fromarray(im)) for im in images]), labels)
    model = PromptedCLIP(backbone)
    by_default, at_once = sharded_features(model, pipeline, pixels, None), sharded_features(model, pipeline, pixels, 256)
    assert by_default.shape == (40, backbone.model.visual.output_dim)
    assert torch.allclose(by_default, at_once, atol=1e-5)


def test_the_frozen_pass_in_onnx_runtime_gives_torchs_features(tmp_path, monkeypatch):
    """auto runs the frozen pass in ONNX Runtime on CPU (the service's graph, exported into the shared cache)."""
    from backbone import PromptedCLIP
    from training.features import frozen_encoder, sharded_features

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a cache of its own: the export itself is exercised
    backbone = tiny_backbone("keepclip-tiny-b")
    pipeline, model = PixelPipeline(backbone.preprocess), PromptedCLIP(backbone)
    images, labels = colour_images(per_class=10)
    pixels = ImageSet(np.stack([pipeline.pixels(__import__("PIL.Image").Image.fromarray(im)) for im in images]), labels)
    in_torch = sharded_features(model, pipeline, pixels, None, runtime="torch")
    in_onnx = sharded_features(model, pipeline, pixels, None, runtime="auto")
    assert list(tmp_path.glob("keepclip/onnx/*/image_frozen.onnx")), "auto on CPU: the ONNX graph"
    assert torch.allclose(in_torch, in_onnx, atol=1e-5) and not torch.equal(in_torch, in_onnx)
    with pytest.raises(ValueError, match="auto, torch or onnx"):
        frozen_encoder(model, "tensorrt")
