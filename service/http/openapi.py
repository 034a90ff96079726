"""What the OpenAPI schema documents beyond what FastAPI infers from the routes: the error responses, and the request
bodies, which body.py reads by hand (JSON or multipart) where FastAPI cannot see them. A route's `openapi_extra` from
`body_doc` names its request model for JSON and describes its multipart form; `document_request_models` adds those
models to the schema's components."""
from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .. import schemas as S

ERRORS = {s: {"model": S.ErrorResponse} for s in (400, 404, 413, 415, 422)}
ADMIN_ERRORS = {s: {"model": S.ErrorResponse} for s in (401, 403, 404, 409, 422)}
FILE = {"type": "string", "format": "binary"}
FILES = {"type": "array", "items": FILE}
STRINGS = {"type": "array", "items": {"type": "string"}}
ONE_UPLOAD = "the image in `file` or `image` (either name, one image)"

_DOCUMENTED: dict[str, type[BaseModel]] = {}  # request models named by a body_doc, for the components


def body_doc(model: type[BaseModel], description: str | None = None, **form: dict) -> dict:
    """`openapi_extra` of a route whose body is `model` as JSON, or the multipart `form` fields (name: schema)."""
    _DOCUMENTED[model.__name__] = model
    multipart = {"type": "object", **({"description": description} if description else {}), "properties": form}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


def document_request_models(app: FastAPI) -> None:
    """Adds the request models that `body_doc` names to the app's schema."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in sorted(_DOCUMENTED.items()):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[name] = body
        if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):  # FastAPI's own 422 shape, which we never send
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
