"""Wire shapes of the HTTP API (the OpenAPI schema at /docs is generated from these)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class _Request(BaseModel):
    """Request bodies: unknown fields are refused, and types are strict (`true` is no version, `"5"` no top_k);
    multipart values are converted from text by the API before they get here."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _FromEngine(BaseModel):
    """Answers read off the engine's result dataclasses (service.engine, service.router), whose fields they share:
    `ClassifyResponse.from_result(result)` is the whole translation."""

    model_config = ConfigDict(from_attributes=True)


# ----------------------------------------------------------------------------- errors
class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. invalid_image, task_not_found")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# ----------------------------------------------------------------------------- classify
class ClassifyRequest(_Request):
    """JSON form of POST /v1/classify (multipart/form-data takes the same fields, with `file` or `image` for the upload,
    repeated for several images, or `images`). Give `image` (answer: one ClassifyResponse) or `images` (answer: a
    ClassifyManyResponse, results in order)."""

    image: str | None = Field(None, description="the image file, base64 (a data: URL prefix is accepted)")
    images: list[str] | None = Field(
        None, description="several image files, base64, classified alike and each routed on its own; at most "
        "`max_images_per_request` (64 by default)",
    )
    task: str | None = Field(None, description="classify within this task's classes (its prompts at w = 1)")
    labels: list[str] | None = Field(
        None, description="open-vocabulary labels; routing still applies the matching task's prompts, weighted"
    )
    top_k: int = Field(5, ge=1, description="how many scores to return")


class Score(_FromEngine):
    label: str
    score: float = Field(description="softmax probability over the classes or labels")
    logit: float = Field(description="logit_scale x cosine similarity")


class Candidate(_FromEngine):
    task: str
    log_likelihood: float


class Routing(_FromEngine):
    task: str | None = Field(description="task the router picked for this image; null = none (frozen CLIP)")
    gate: float = Field(description="calibrated gate weight w of that task (0 when none)")
    best: str | None = Field(description="most likely task even when its gate was below the threshold")
    best_gate: float
    candidates: list[Candidate] = Field(description="FAISS candidate tasks, most likely first")


class ClassifyResponse(_FromEngine):
    mode: Literal["task", "labels", "auto"]
    task: str | None = Field(description="task whose prompts were applied (and whose classes, unless labels)")
    version: int | None = Field(description="version of that task")
    gate: float = Field(description="weight applied to the task's prompts (1 with an explicit task; 0 = frozen CLIP)")
    routed: Routing = Field(validation_alias=AliasChoices("routed", "route"))  # the engine's ClassifyResult.route
    scores: list[Score]
    message: str | None = None
    generation: int = Field(description="store generation the replica served this request from")

    @classmethod
    def from_result(cls, result: Any) -> ClassifyResponse:
        """The answer to one image from the engine's ClassifyResult."""
        return cls.model_validate(result)


class ClassifyManyResponse(BaseModel):
    """The answer to several images (JSON `images`, or several multipart parts)."""

    results: list[ClassifyResponse] = Field(description="one result per image, in the order sent")


# ----------------------------------------------------------------------------- embed
class EmbedRequest(_Request):
    image: str | None = Field(None, description="base64 image (give image or text)")
    text: str | list[str] | None = Field(None, description="one text or a list of texts")
    task: str | None = Field(None, description="apply this task's prompts (default: frozen CLIP)")
    weight: float = Field(1.0, ge=0.0, le=1.0, description="weight of the task's prompts")


class EmbedResponse(BaseModel):
    kind: Literal["image", "text"]
    embeddings: list[list[float]] = Field(description="L2-normalised embeddings, one per input")
    dim: int
    task: str | None
    version: int | None
    weight: float


# ----------------------------------------------------------------------------- gallery / search
class GalleryItem(_Request):
    id: str = Field(min_length=1, max_length=256)
    image: str = Field(description="base64 image")


class GalleryRequest(_Request):
    items: list[GalleryItem] = Field(min_length=1)


class GalleryResponse(BaseModel):
    added: list[str]
    size: int = Field(description="items in this replica's gallery")


class SearchRequest(_Request):
    text: str | None = Field(None, min_length=1, description="text query (give text or image)")
    image: str | None = Field(None, description="base64 image query")
    top_k: int = Field(5, ge=1)


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity of frozen embeddings")


class SearchResponse(BaseModel):
    query: Literal["text", "image"]
    results: list[SearchHit]


# ----------------------------------------------------------------------------- tasks
class TaskSummary(BaseModel):
    name: str
    version: int | None = Field(description="live version in the store")
    loaded_version: int | None = Field(description="version this replica serves (null: not served)")
    kind: str | None
    num_classes: int | None
    created_at: str | None
    error: str | None = Field(None, description="why the live version is not served, if it is not")


class TasksResponse(BaseModel):
    generation: int = Field(description="store generation")
    served_generation: int = Field(description="generation this replica has applied")
    tasks: list[TaskSummary]


class TaskVersion(BaseModel):
    version: int
    live: bool
    kind: str | None
    num_classes: int | None
    created_at: str | None
    metrics: dict[str, Any] | None
    error: str | None = None


class TaskDetail(TaskSummary):
    class_names: list[str] | None
    templates: list[str] | None
    metrics: dict[str, Any] | None
    versions: list[TaskVersion]


class RollbackRequest(_Request):
    version: int = Field(ge=1, description="version to make live again")


class TaskChanged(BaseModel):
    name: str
    op: Literal["delete", "rollback"]
    version: int | None
    generation: int = Field(description="store generation after the change; replicas follow within a poll interval")


# ----------------------------------------------------------------------------- health
class Health(BaseModel):
    status: Literal["ok", "degraded"]
    generation: int
    tasks: int
    polling: bool
    last_poll_error: str | None
    device: str
    backbone: dict[str, str]
    gallery_size: int
