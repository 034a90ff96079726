"""Loading: config JSON + checkpoint, fingerprints, freezing, refusals with messages that say what to do."""
import json
import time

import huggingface_hub
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from backbone import BackboneError, UnsupportedBackbone, WeightsUnavailable, load_backbone, sha256_file
from backbone.loading import SUPPORTED, tag_needs_quick_gelu
from tests.conftest import TINY_CONFIGS, free_port, tiny_backbone


def test_everything_is_frozen_and_in_eval_mode(tiny_name):
    model = tiny_backbone(tiny_name).model
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_random_init_fingerprint_is_the_hash_of_the_weights(tiny_name):
    a, b, c = tiny_backbone(tiny_name, seed=0), tiny_backbone(tiny_name, seed=0), tiny_backbone(tiny_name, seed=1)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.name == tiny_name and a.fingerprint.sha256 != c.fingerprint.sha256


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_config_json_plus_local_checkpoint(tmp_path, fmt):
    source = tiny_backbone("keepclip-tiny-a", seed=3)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)

    loaded = load_backbone(str(TINY_CONFIGS / "keepclip-tiny-a.json"), str(path), "cpu")

    assert loaded.fingerprint.sha256 == sha256_file(path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = tiny_backbone("keepclip-tiny-b").model.state_dict()
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, path)
    with pytest.raises(BackboneError, match="could not load weights"):
        load_backbone(str(TINY_CONFIGS / "keepclip-tiny-a.json"), str(path), "cpu")


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_damaged_checkpoint_is_refused(tmp_path, suffix):
    path = tmp_path / f"damaged.{suffix}"
    path.write_bytes(b"\x00garbage, not weights" * 10)
    with pytest.raises(BackboneError, match="could not load weights"):
        load_backbone(str(TINY_CONFIGS / "keepclip-tiny-a.json"), str(path), "cpu")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("RN50", "ModifiedResNet"),
        ("ViT-B-16-SigLIP", "timm model"),
        ("convnext_base", "timm model"),
        ("xlm-roberta-base-ViT-B-32", "Hugging Face model"),
        ("coca_ViT-B-32", "CoCa"),
    ],
)
def test_unsupported_towers_are_refused_before_any_download(name, reason):
    assert open_clip.get_model_config(name) is not None, f"open_clip no longer ships {name}"
    with pytest.raises(UnsupportedBackbone) as err:
        load_backbone(name, "this-tag-is-never-fetched", "cpu")
    assert reason in str(err.value) and SUPPORTED in str(err.value)


def test_download_failure_says_how_to_pass_a_local_checkpoint(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE makes the hub fail at once: no network is touched
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailable) as err:
        load_backbone("ViT-B-32", "openai", "cpu", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "could not fetch the pretrained weights 'openai'" in message
    assert "--pretrained /path/to/" in message and "KEEPCLIP_PRETRAINED" in message


def test_an_unreachable_hub_goes_to_the_cache_at_once(tmp_path, monkeypatch):
    """Offline, huggingface_hub retried for ~50 s before it looked in its cache; now: cached weights in moments, and
    missing ones fail as fast (the hub here: a local port nothing listens on)."""
    from backbone.loading import _fetch_pretrained

    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].rstrip("/")
    snapshot = tmp_path / "cache" / f"models--{repo.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    weights = snapshot / "snapshots" / ("0" * 40) / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, weights)
    started = time.monotonic()
    assert _fetch_pretrained("ViT-B-32", "openai", str(tmp_path / "cache")) == str(weights)
    with pytest.raises(WeightsUnavailable, match="could not fetch the pretrained weights 'openai'"):
        _fetch_pretrained("ViT-B-32", "openai", str(tmp_path / "empty"))
    assert time.monotonic() - started < 10
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # as it was: only those calls were offline


@pytest.mark.parametrize(
    "model, pretrained, match",
    [
        ("no-such-model", None, "unknown open_clip model 'no-such-model'"),
        ("{tmp}/missing.json", None, "model config file not found"),
        ("{tmp}/broken.json", None, "is not valid JSON"),
        ("{tmp}/incomplete.json", None, "lacks the open_clip keys"),
        ("ViT-B-32", "not-a-tag-or-file", "neither a checkpoint file nor a known open_clip tag"),
    ],
)
def test_bad_model_or_weights_arguments_are_named(tmp_path, model, pretrained, match):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "incomplete.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(BackboneError, match=match):
        load_backbone(model.format(tmp=tmp_path), pretrained, "cpu")


def test_cuda_request_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackboneError, match="no CUDA GPU"):
        load_backbone(str(TINY_CONFIGS / "keepclip-tiny-a.json"), None, "cuda")


def test_openai_tags_get_quick_gelu_as_trained():
    assert tag_needs_quick_gelu("ViT-B-16", "openai")
    assert not tag_needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not tag_needs_quick_gelu("ViT-B-16", None)
