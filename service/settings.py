"""Typed settings of the service: the one source of defaults for `keepclip serve`, the Serve app builder and tests.

Precedence (highest first): values passed in code or on the command line, `KEEPCLIP_*` environment variables,
a `.env` file, a settings file (YAML or JSON; `KEEPCLIP_SETTINGS_FILE` or `ServiceSettings.load(file=...)`),
then the defaults below. The backbone and store fields are inherited from `backbone.settings.BackboneSettings`
and `prompts_store.StoreSettings`, so every command agrees on them.
"""
from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from backbone.settings import MAX_IMAGE_PIXELS, BackboneSettings
from prompts_store.settings import StoreSettings

SETTINGS_FILE_ENV = "KEEPCLIP_SETTINGS_FILE"
_settings_file: ContextVar[str | None] = ContextVar("keepclip_settings_file", default=None)

# The knobs a running deployment can change without a restart (Serve `user_config` -> `reconfigure`).
RUNTIME_KNOBS = ("max_batch_size", "batch_wait_timeout_s", "gate_threshold", "router_top_k", "poll_interval_s")


class _FileSource(PydanticBaseSettingsSource):
    """Values from a YAML or JSON settings file (keys are field names, without the KEEPCLIP_ prefix)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str):
        super().__init__(settings_cls)
        self.path = Path(path)

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read settings file {self.path}: {e}") from None
        if self.path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"settings file {self.path} must hold a mapping of setting names to values")
        return {k: v for k, v in data.items() if k in self.settings_cls.model_fields}


class ServiceSettings(BackboneSettings, StoreSettings):
    """Everything the service needs; each field also reads `KEEPCLIP_<FIELD>` from the environment."""

    model_config = SettingsConfigDict(env_prefix="KEEPCLIP_", env_file=".env", extra="ignore")

    # --- where it listens (keepclip serve) ---
    host: str = Field("127.0.0.1", description="Serve's HTTP host (HAProxy's or the proxy's, see ingress)")
    port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP port (HAProxy's or the proxy's, see ingress)")
    app_name: str = Field("keepclip", description="Serve application name")
    route_prefix: str = Field("/", description="Serve route prefix of the application")
    ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy", description="what takes HTTP in front of the replicas, in a Ray cluster keepclip serve starts "
        "itself: haproxy = Ray Serve's HAProxy ingress (HAProxy forwards each connection straight to a replica's own "
        "HTTP server; 1.5-2.6x the images/s of the proxy at 8 clients on 2 CPU cores), proxy = Serve's Python HTTP proxy, which "
        "hands each request to a replica through Ray. Falls back to proxy where no HAProxy binary is installed; a "
        "cluster keepclip joins keeps its own (RAY_SERVE_ENABLE_HA_PROXY)",
    )

    # --- replicas ---
    num_replicas: int = Field(
        0, ge=0, description="Serve replicas; 0 or 'auto': 2 when the Ray cluster has the CPUs (and GPUs) for two "
        "replicas, else 1 — a second replica keeps answering while one restarts. Each polls the store and holds its "
        "own gallery",
    )
    replica_routing: Literal["primary", "balanced"] = Field(
        "primary", description="primary: every request goes to one replica while it is up and has a free slot, the "
        "others are hot standbys (one gallery); balanced: Serve's power-of-two-choices over all replicas (more "
        "throughput, a gallery per replica)",
    )
    replica_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica")
    replica_gpus: float = Field(0.0, ge=0, description="Ray GPUs per replica (set 1 with --device cuda)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per replica (None: 1 on CPU, so that HTTP parsing, image "
        "decoding and Serve's proxy keep a core beside the model; torch's default on GPU)",
    )
    malloc_arena_max: int = Field(
        2, ge=0, description="glibc malloc arenas per replica process (MALLOC_ARENA_MAX; 0: glibc's default, 8 per "
        "core). Image decoding on many threads at once leaves freed memory in many arenas, which glibc keeps: after "
        "40 concurrent large images a replica kept 2.3-2.5 GiB with the default against 1.6 GiB with 2",
    )
    engine_batches: int | None = Field(
        None, ge=1, le=16, description="batches one replica runs at once, each on its own engine thread with "
        "torch_threads threads. None (auto): on CPU with 2+ cores, 2 while the image passes run in torch eager "
        "(runtime torch, or a prompt task deeper than the ONNX graphs hold) or in the prompted ONNX graphs (any prompt "
        "task loaded): their calls leave the GIL, so a second batch uses another core (1.0-1.5x over HTTP on 2 cores); "
        "1 while only the frozen graphs run (head tasks: 0.7-1.07x with 2); 1 on GPU",
    )
    access_log: bool = Field(
        False, description="Serve's access log: a line per request in each replica's log file. Off by default: at "
        "hundreds of requests a second it costs a share of the replica's event loop, and /metrics already counts "
        "requests by route, status and latency",
    )
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="the level of Ray's and Serve's own log lines (cluster and Serve start-up, HAProxy "
        "reloads, replica ports) on the console and in Serve's log files; keepclip's own lines (tasks loaded, "
        "requests refused) are always shown. INFO: every step Ray takes",
    )
    max_ongoing_requests: int = Field(
        256, ge=1, description="requests one replica holds at once, those still receiving their body included "
        "(at least 2 x max_batch_size is used)",
    )

    # --- inference runtime (service/runtime_onnx.py) ---
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="what runs the towers: torch eager, ONNX Runtime, or auto = the faster on a startup probe"
    )
    onnx_cache_dir: str | None = Field(
        None, description="exported ONNX graphs, per backbone (None: $XDG_CACHE_HOME/keepclip/onnx or ~/.cache/keepclip/onnx)"
    )
    onnx_opset: int = Field(17, ge=7, le=20, description="ONNX opset of the exported graphs (older onnxruntime: lower)")

    # --- batching and routing (runtime knobs, see RUNTIME_KNOBS) ---
    max_batch_size: int = Field(16, ge=1, le=1024, description="largest dynamic batch of images")
    batch_wait_timeout_s: float | None = Field(
        None, ge=0, le=10, description="under load only: how long a batch formed right after the previous one may "
        "wait for more images (until the recent load is queued, at most max_batch_size); an image that finds the "
        "engine idle never waits. None (auto): the fixed part of a batch's run time, fitted over the last 64 batches "
        "(what an image saves by joining a batch rather than starting another; on 2 CPU cores at 8 one-image "
        "clients: mean batch 4.4 against 3.9, about 9 percent fewer images/s). 0: never wait, the most images/s on CPU",
    )
    router_top_k: int = Field(3, ge=1, le=64, description="candidate tasks FAISS hands to the exact Gaussian check")
    gate_threshold: float = Field(
        0.01, ge=0, le=1, description="gate weights below this are treated as 0: frozen answer, no prompted pass"
    )
    poll_interval_s: float = Field(0.25, gt=0, le=60, description="how often each replica polls the store's change feed")
    zero_shot_check: bool = Field(
        True, description="a task claims an image only if it explains it better than the open vocabulary does, "
        "calibrated per task on its own held-out images (no effect with vocabulary 'none' or tasks made before it)",
    )

    # --- security and limits ---
    admin_token: SecretStr | None = Field(
        None, description="bearer token for DELETE/rollback of tasks; unset = those endpoints are refused"
    )
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="largest request body accepted (413 above)")
    body_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="the whole request body must arrive within this many seconds of reaching "
        "a replica, else 408 (a floor of max_body_bytes / body_timeout_s bytes/s; raise it for slow links)",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="HAProxy ingress: the request line and headers must arrive within this many "
        "seconds, else 408 and the connection is closed (so slow-header clients cannot hold every connection)",
    )
    max_connections_per_client: int = Field(
        1024, ge=0, description="HAProxy ingress: connections one client address may hold at once; more are refused "
        "at connect, so one address cannot take all of HAProxy's 4,096 (0: no limit). Behind a load balancer that "
        "connects from one address, raise it or set 0 and limit clients there",
    )
    max_body_reads: int = Field(
        192, ge=1, description="requests per replica that may be receiving their body at once; more are refused at "
        "once with 503 + Retry-After, so slow senders cannot take every slot (must be below max_ongoing_requests)",
    )
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, description="largest decoded image (width x height) accepted; guards decompression bombs"
    )
    max_decoding_pixels: int | None = Field(
        None, ge=1, description="pixels one replica decodes at once, over all requests (None: 2 x max_image_pixels); "
        "past it, decoders wait their turn, so that many small files of huge images cannot take the replica's memory "
        "(3 bytes per pixel of decoded RGB, plus what resizing it takes)",
    )
    max_labels: int = Field(256, ge=1, description="most labels in one open-vocabulary request")
    max_label_chars: int = Field(200, ge=1, description="longest label")
    max_top_k: int = Field(100, ge=1, description="largest top_k a request may ask for")
    max_gallery_items: int = Field(100_000, ge=1, description="gallery capacity per replica")
    max_images_per_request: int = Field(64, ge=1, description="most images in one classify or gallery request")

    # --- answers for images no task claims ---
    vocabulary: str = Field(
        "imagenet-1k", description="open vocabulary of the frozen CLIP answer for images no learned task claims "
        "(task-agnostic mode): 'imagenet-1k' (open_clip's 1,000 ImageNet class names), a file (one name per line, or a "
        "JSON list), or 'none' (such images get empty scores)",
    )

    # --- UI ---
    ui: bool = Field(True, description="mount the Gradio UI at /ui")
    ui_max_requests: int = Field(
        32, ge=1, description="UI requests a replica holds at once (every open page keeps a stream open); more are "
        "refused at once with 503 + Retry-After, so the UI cannot take the slots the API needs (max_body_reads + this "
        "must be below max_ongoing_requests)",
    )

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary_loads(cls, value: str) -> str:
        from .vocabulary import load_vocabulary

        load_vocabulary(value)  # a typo'd path fails here, at `keepclip serve`, not in every replica
        return value

    @field_validator("num_replicas", mode="before")
    @classmethod
    def _auto_replicas(cls, value: Any) -> Any:
        return 0 if isinstance(value, str) and value.strip().lower() == "auto" else value

    @model_validator(mode="after")
    def _slots_left_for_complete_requests(self) -> "ServiceSettings":
        if self.max_body_reads >= self.max_ongoing_requests:
            raise ValueError(f"max_body_reads ({self.max_body_reads}) must be below max_ongoing_requests "
                             f"({self.max_ongoing_requests}): slow senders could otherwise hold every slot")
        if self.ui and self.max_body_reads + self.ui_max_requests >= self.max_ongoing_requests:
            raise ValueError(f"max_body_reads + ui_max_requests ({self.max_body_reads} + {self.ui_max_requests}) must be "
                             f"below max_ongoing_requests ({self.max_ongoing_requests}): slow senders and open UI pages "
                             "could otherwise hold every slot")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings]
        path = _settings_file.get() or os.environ.get(SETTINGS_FILE_ENV)
        if path:
            sources.append(_FileSource(settings_cls, path))
        return tuple(sources)

    @classmethod
    def load(cls, file: str | os.PathLike | None = None, **overrides: Any) -> "ServiceSettings":
        """Settings from `overrides` > environment > .env > `file` (YAML/JSON) > defaults; None overrides are ignored."""
        token = _settings_file.set(str(file) if file else None)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _settings_file.reset(token)

    def runtime_config(self) -> dict[str, Any]:
        """The Serve `user_config` that carries the runtime knobs."""
        return {k: getattr(self, k) for k in RUNTIME_KNOBS}

    def admin_token_value(self) -> str | None:
        token = self.admin_token.get_secret_value() if self.admin_token is not None else None
        return token or None
