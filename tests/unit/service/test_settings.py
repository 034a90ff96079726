"""ServiceSettings: one source of defaults, KEEPCLIP_* environment, settings files, runtime knobs."""
import json

import pytest
from pydantic import ValidationError

from backbone.settings import BackboneSettings
from prompts_store import StoreSettings
from service.settings import RUNTIME_KNOBS, ServiceSettings


def test_backbone_and_store_fields_share_their_defaults():
    s = ServiceSettings()
    assert (s.model, s.pretrained, s.device) == (BackboneSettings().model, BackboneSettings().pretrained, BackboneSettings().device)
    assert s.store == StoreSettings().store
    assert s.admin_token is None and s.admin_token_value() is None


def test_environment_then_file_then_defaults(tmp_path, monkeypatch):
    yaml_file = tmp_path / "keepclip.yaml"
    yaml_file.write_text("store: /from/file\nport: 9001\nmax_batch_size: 4\nnot_a_setting: 1\n")
    monkeypatch.setenv("KEEPCLIP_PORT", "9002")
    monkeypatch.setenv("KEEPCLIP_ADMIN_TOKEN", "zz-s3cr3t")
    s = ServiceSettings.load(file=yaml_file, max_batch_size=None, gate_threshold=0.2)
    assert (s.store, s.port, s.max_batch_size, s.gate_threshold) == ("/from/file", 9002, 4, 0.2)
    assert s.admin_token_value() == "zz-s3cr3t" and "zz-s3cr3t" not in repr(s)
    json_file = tmp_path / "keepclip.json"
    json_file.write_text(json.dumps({"ui": False, "poll_interval_s": 1.5}))
    monkeypatch.setenv("KEEPCLIP_SETTINGS_FILE", str(json_file))
    s = ServiceSettings()
    assert s.ui is False and s.poll_interval_s == 1.5


def test_bad_values_are_refused(monkeypatch):
    with pytest.raises(ValidationError):
        ServiceSettings(gate_threshold=2)
    monkeypatch.setenv("KEEPCLIP_MAX_BATCH_SIZE", "lots")
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_runtime_config_carries_the_knobs():
    assert set(ServiceSettings().runtime_config()) == set(RUNTIME_KNOBS)
