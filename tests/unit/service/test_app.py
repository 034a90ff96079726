"""The Serve app builder and its config file, without starting Ray."""
import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve import Application

from service.app import app_builder, build_app
from service.settings import RUNTIME_KNOBS, ServiceSettings

CONFIG = Path(__file__).resolve().parents[3] / "service" / "serve_config.yaml"


def test_typed_builder_and_import_path_builder(tmp_path):
    assert isinstance(build_app(ServiceSettings(store=str(tmp_path), ui=False)), Application)
    assert isinstance(app_builder({"store": str(tmp_path), "max_batch_size": 4, "ui": False}), Application)


def test_builder_refuses_a_misspelt_setting(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keepclip settings in the Serve config args: \['max_batch_sise'\]"):
        app_builder({"store": str(tmp_path), "max_batch_sise": 4})


def test_serve_config_is_loadable_by_serve_and_kuberay():
    config = yaml.safe_load(CONFIG.read_text())
    app = config["applications"][0]
    module, attr = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is app_builder
    ServiceSettings(**app["args"])  # every arg is a setting
    assert set(app["deployments"][0]["user_config"]) <= set(RUNTIME_KNOBS)


def test_serve_access_log_and_log_level_follow_the_settings(tmp_path):
    """Serve's line per request costs the replica's event loop; it is off unless `access_log` asks for it. Ray's own
    INFO lines stay off the console unless `ray_log_level` asks for them."""
    def logging_config(**settings) -> dict:
        deployment = build_app(ServiceSettings(store=str(tmp_path), ui=False, **settings))._bound_deployment
        return deployment._deployment_config.logging_config

    assert logging_config()["enable_access_log"] is False and logging_config()["log_level"] == "WARNING"
    assert logging_config(access_log=True)["enable_access_log"] is True
    assert logging_config(access_log=True)["log_level"] == "INFO"  # where Serve writes the access lines
    assert logging_config(ray_log_level="DEBUG")["log_level"] == "DEBUG"


def test_serve_gives_up_once_nothing_listens_on_its_port():
    """What `keepclip serve` does when its ingress is gone for good: IngressGone (exit 1), not a live-looking corpse;
    while something accepts connections, it waits for Ctrl-C."""
    import socket
    import threading

    from service.app import IngressGone, _watch_ingress
    from tests.conftest import free_port

    closed = free_port()
    with pytest.raises(IngressGone, match=f"nothing has listened on 127.0.0.1:{closed} for 0 s \\(HAProxy stopped\\)"):
        _watch_ingress("0.0.0.0", closed, "HAProxy", threading.Event(), every_s=0.05, gone_after_s=0.3)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        stop = threading.Event()
        threading.Timer(0.5, stop.set).start()
        _watch_ingress("127.0.0.1", listening.getsockname()[1], "HAProxy", stop, every_s=0.05, gone_after_s=0.2)


def test_user_config_reconfigures_a_replica_and_a_null_wait_is_auto(settings):
    """Serve's `user_config` -> `reconfigure` on a replica's own parts (no Ray): knobs change without a restart,
    `batch_wait_timeout_s: null` means the auto wait (the fitted fixed cost of a batch), unknown keys are refused."""
    from service.app import KeepclipDeployment
    from service.batching import engine_batcher, engine_executor
    from service.engine import Engine

    replica = object.__new__(KeepclipDeployment.func_or_class)  # __init__ is Serve's (async): its parts, made here
    replica.settings, replica.engine, replica.executor = settings, Engine.from_settings(settings), engine_executor(settings)
    replica.batcher = engine_batcher(replica.engine, settings, replica.executor)
    try:
        replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.5, "gate_threshold": None})
        assert (replica.batcher.max_batch_size, replica.batcher.wait_limit()) == (8, 0.5)
        assert replica.settings.gate_threshold == settings.gate_threshold  # null leaves other knobs as they are
        replica.reconfigure({"batch_wait_timeout_s": None})
        assert replica.batcher.wait_s is None and replica.settings.batch_wait_timeout_s is None
        assert replica.batcher.wait_limit() == replica.batcher.cost.fixed_s() == 0  # no batches yet: no wait
        with pytest.raises(ValueError, match=r"unknown user_config keys \['batch_wait'\]"):
            replica.reconfigure({"batch_wait": 1})
    finally:
        replica.engine.close()
        replica.executor.shutdown()
