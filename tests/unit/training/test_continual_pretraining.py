"""Continual pretraining: the compatible momentum update is exactly m <- 0.9 m + 0.05 current + 0.05 previous, the
topology term vanishes when nothing moved, one task's training moves both towers of the momentum model, and the
model after a task round-trips through the store."""
import dataclasses

import pytest
import torch

from prompts_store import open_store
from training.errors import InputError

from tests.conftest import tiny_backbone
from training.continual_pretraining import ContinualPretrainer, ContinualPretrainingSettings, compatible_momentum_update, topology_kl

from .test_image_text_prompts import colour_task


def test_momentum_update_formula_on_small_tensors():
    def linear(w, b):
        layer = torch.nn.Linear(2, 1)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([w])), layer.bias.copy_(torch.tensor([b]))
        return layer

    m, current, previous = linear([1.0, 2.0], 3.0), linear([11.0, -2.0], 5.0), linear([-1.0, 0.0], 7.0)
    compatible_momentum_update(m, current, previous, (0.9, 0.05, 0.05))
    assert torch.allclose(m.weight, torch.tensor([[0.9 * 1 + 0.05 * 11 - 0.05 * 1, 0.9 * 2 - 0.05 * 2 + 0.0]]))
    assert torch.allclose(m.bias, torch.tensor([0.9 * 3 + 0.05 * 5 + 0.05 * 7]))
    assert torch.equal(current.weight, torch.tensor([[11.0, -2.0]])) and torch.equal(previous.bias, torch.tensor([7.0]))


def test_topology_term_is_zero_without_change_and_positive_with_it():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    assert topology_kl(img, txt, img, txt, scale).abs() < 1e-6
    moved = torch.nn.functional.normalize(img + 0.5 * torch.randn(6, 8, generator=g), dim=-1)
    assert topology_kl(moved, txt, img, txt, scale) > 1e-3


def test_learning_a_task_moves_both_towers_of_the_momentum_model(tmp_path):
    torch.set_num_threads(1)
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    trainer = ContinualPretrainer(backbone, ContinualPretrainingSettings(epochs=1, batch_size=16, warmup_steps=1, lr=1e-3))
    task = colour_task(backbone)
    seconds = trainer.learn(task, progress=False)
    store = open_store(tmp_path / "store")
    store.publish(trainer.artifact(task, seconds))
    fresh = ContinualPretrainer(tiny_backbone())  # the pretrained model again
    fresh.load(store.get(task.name))  # checksums verified on the way
    assert all(torch.equal(v, fresh.momentum_model.state_dict()[k]) for k, v in trainer.momentum_model.state_dict().items())
    assert store.get(task.name).kind == "continual-pretraining"
    with pytest.raises(InputError, match="not a continual-pretraining checkpoint"):
        fresh.load(dataclasses.replace(store.get(task.name), kind="residual-prompts"))
    after = trainer.momentum_model.state_dict()
    moved = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert any(k.startswith("visual.") for k in moved) and any(k.startswith("transformer.") for k in moved)
    assert trainer.momentum_model is backbone.model  # trained in place: what the benchmark evaluates
