"""Typed Python client of the keepclip HTTP API (httpx). Talks HTTP only: nothing here imports the service.

    from clients.client import KeepclipClient
    with KeepclipClient("http://127.0.0.1:8000") as kc:
        result = kc.classify("cat.jpg")                    # task-agnostic: routed task, gate, scores
        result.task, result.gate, result.scores[0].label
        kc.classify_many(["cat.jpg", "dog.jpg"])            # several images in one request: a list, in order
        kc.classify("cat.jpg", labels=["cat", "dog"])       # open vocabulary
        kc.tasks().tasks                                    # live tasks
        KeepclipClient(token="...").delete_task("cifar10")  # admin (KEEPCLIP_ADMIN_TOKEN)

Errors: `ServiceUnreachable` when nothing answers at the URL; `KeepclipError` (with .status, .code, .message)
for every refusal the service sends, and for an answer that is not the service's JSON.
"""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ImageLike = Union[str, os.PathLike, bytes, Any]  # a path, encoded bytes, a PIL image or an HWC uint8 array


class ClientSettings(BaseSettings):
    """Defaults of the client and the CLI's client commands (`KEEPCLIP_URL`, `KEEPCLIP_ADMIN_TOKEN`, ...)."""

    model_config = SettingsConfigDict(env_prefix="KEEPCLIP_", extra="ignore")

    url: str = Field("http://127.0.0.1:8000", description="base URL of the keepclip service")
    admin_token: SecretStr | None = Field(None, description="bearer token for admin endpoints")
    timeout_s: float = Field(60.0, gt=0, description="HTTP timeout per request")


class KeepclipError(RuntimeError):
    """`.status`: the HTTP status, or 0 when there was no HTTP answer (nothing listening; a store worked on directly)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ServiceUnreachable(KeepclipError):
    def __init__(self, url: str, reason: str):
        super().__init__(0, "unreachable", f"cannot reach keepclip at {url} ({reason}); is `keepclip serve` running there?")


# ----------------------------------------------------------------------------- response models (tolerant)
class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Score(_Model):
    label: str
    score: float
    logit: float


class Candidate(_Model):
    task: str
    log_likelihood: float


class Routing(_Model):
    task: str | None
    gate: float
    best: str | None = None
    best_gate: float = 0.0
    candidates: list[Candidate] = []


class Classification(_Model):
    mode: str
    task: str | None
    version: int | None
    gate: float
    routed: Routing
    scores: list[Score]
    message: str | None = None
    generation: int = 0


class Classifications(_Model):
    results: list[Classification]


class Embeddings(_Model):
    kind: str
    embeddings: list[list[float]]
    dim: int
    task: str | None
    version: int | None
    weight: float


class GalleryResult(_Model):
    added: list[str]
    size: int


class SearchHit(_Model):
    id: str
    score: float


class SearchResult(_Model):
    query: str
    results: list[SearchHit]


class TaskSummary(_Model):
    name: str
    version: int | None
    loaded_version: int | None
    kind: str | None = None
    num_classes: int | None = None
    created_at: str | None = None
    error: str | None = None


class TaskList(_Model):
    generation: int
    served_generation: int | None = None  # None when read from the store itself (`StoreTasks`)
    tasks: list[TaskSummary]


class TaskVersion(_Model):
    version: int
    live: bool
    kind: str | None = None
    num_classes: int | None = None
    created_at: str | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None


class TaskDetail(TaskSummary):
    class_names: list[str] | None = None
    templates: list[str] | None = None
    metrics: dict[str, Any] | None = None
    versions: list[TaskVersion] = []


class TaskChange(_Model):
    name: str
    op: str
    version: int | None
    generation: int


class Health(_Model):
    status: str
    generation: int
    tasks: int
    polling: bool
    last_poll_error: str | None = None
    device: str
    backbone: dict[str, str]
    gallery_size: int = 0


# ----------------------------------------------------------------------------- the client
def _labels_need_json(labels: Sequence[str] | None) -> bool:
    """One multipart `labels` value is split at commas by the service: such labels (or a single one) go as JSON."""
    return labels is not None and (len(labels) < 2 or any("," in label for label in labels))


def _classify_form(task: str | None, labels: Sequence[str] | None, top_k: int) -> dict[str, Any]:
    form: dict[str, Any] = {"top_k": str(top_k)}
    if task is not None:
        form["task"] = task
    if labels is not None:
        form["labels"] = list(labels)
    return form


def image_bytes(image: ImageLike) -> tuple[str, bytes]:
    """(file name, encoded bytes) of a path, raw bytes, a PIL image or an HWC uint8 array (PNG-encoded)."""
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise TypeError("pass a path or bytes (Pillow is needed for image objects)") from None
    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "image.png", buf.getvalue()


class KeepclipClient:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float | None = None,
        http: httpx.Client | None = None,
    ):
        """`http`: an httpx.Client to use instead of a new one (e.g. FastAPI's TestClient for an in-process app)."""
        defaults = ClientSettings()
        self.url = (url or defaults.url).rstrip("/")
        if token is None and defaults.admin_token is not None:
            token = defaults.admin_token.get_secret_value()
        self.token = token or None
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout_s or defaults.timeout_s)

    def __enter__(self) -> "KeepclipClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ inference
    def classify(
        self, image: ImageLike, task: str | None = None, labels: Sequence[str] | None = None, top_k: int = 5
    ) -> Classification:
        name, data = image_bytes(image)
        if _labels_need_json(labels):
            body = {"image": base64.b64encode(data).decode(), "task": task, "labels": list(labels), "top_k": top_k}
            return Classification.model_validate(self._request("POST", "/v1/classify", json=body))
        form = _classify_form(task, labels, top_k)
        return Classification.model_validate(self._request("POST", "/v1/classify", data=form, files={"file": (name, data)}))

    def classify_many(
        self, images: Sequence[ImageLike], task: str | None = None, labels: Sequence[str] | None = None, top_k: int = 5
    ) -> list[Classification]:
        """Several images in one request, results in the same order: the images join the service's dynamic batch
        together and are still routed each on its own. At most the service's `max_images_per_request` (64 by
        default) and `max_body_bytes` (16 MiB) per call."""
        encoded = [image_bytes(image) for image in images]
        if not encoded:
            return []
        if _labels_need_json(labels):
            body = {"images": [base64.b64encode(data).decode() for _, data in encoded], "task": task, "labels": list(labels), "top_k": top_k}
            answer = self._request("POST", "/v1/classify", json=body)
        else:
            files = [("images", (name, data)) for name, data in encoded]  # `images`: the answer is a list even for one
            answer = self._request("POST", "/v1/classify", data=_classify_form(task, labels, top_k), files=files)
        return Classifications.model_validate(answer).results

    def embed_image(self, image: ImageLike, task: str | None = None, weight: float = 1.0) -> Embeddings:
        name, data = image_bytes(image)
        form = {"weight": str(weight), **({"task": task} if task else {})}
        return Embeddings.model_validate(self._request("POST", "/v1/embed", data=form, files={"file": (name, data)}))

    def embed_text(self, texts: str | Sequence[str], task: str | None = None, weight: float = 1.0) -> Embeddings:
        body = {"text": texts if isinstance(texts, str) else list(texts), "task": task, "weight": weight}
        return Embeddings.model_validate(self._request("POST", "/v1/embed", json=body))

    def gallery_add(self, items: Mapping[str, ImageLike] | Iterable[tuple[str, ImageLike]]) -> GalleryResult:
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        files = [("files", image_bytes(image)) for _, image in pairs]
        return GalleryResult.model_validate(self._request("POST", "/v1/gallery", data={"ids": [i for i, _ in pairs]}, files=files))

    def search(self, text: str | None = None, image: ImageLike | None = None, top_k: int = 5) -> SearchResult:
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text or image")
        if text is not None:
            return SearchResult.model_validate(self._request("POST", "/v1/search", json={"text": text, "top_k": top_k}))
        name, data = image_bytes(image)
        return SearchResult.model_validate(self._request("POST", "/v1/search", data={"top_k": str(top_k)}, files={"file": (name, data)}))

    # ------------------------------------------------------------------ tasks
    def tasks(self) -> TaskList:
        return TaskList.model_validate(self._request("GET", "/v1/tasks"))

    def task(self, name: str) -> TaskDetail:
        return TaskDetail.model_validate(self._request("GET", f"/v1/tasks/{name}"))

    def delete_task(self, name: str) -> TaskChange:
        return TaskChange.model_validate(self._request("DELETE", f"/v1/tasks/{name}", admin=True))

    def rollback_task(self, name: str, version: int) -> TaskChange:
        return TaskChange.model_validate(self._request("POST", f"/v1/tasks/{name}/rollback", json={"version": version}, admin=True))

    # ------------------------------------------------------------------ operations
    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/healthz"))

    def metrics(self) -> str:
        return self._request("GET", "/metrics", raw=True)

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, admin: bool = False, raw: bool = False, **kwargs) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if admin and self.token else {}
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise ServiceUnreachable(self.url, type(e).__name__) from None
        except httpx.TimeoutException:
            raise ServiceUnreachable(self.url, "timed out") from None
        except httpx.TransportError as e:
            raise ServiceUnreachable(self.url, f"{type(e).__name__}: {e}") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise KeepclipError(response.status_code, error["code"], error["message"])
            except (ValueError, KeyError, TypeError):
                raise KeepclipError(response.status_code, "http_error", response.text[:500]) from None
        if raw:
            return response.text
        try:
            return response.json()
        except ValueError:  # something else answers at this URL (a proxy's HTML page, another service)
            raise KeepclipError(response.status_code, "not_json", f"{self.url}{path} answered with something other than JSON; is it a keepclip service?") from None
