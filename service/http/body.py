"""Request bodies. Every endpoint that takes a body accepts JSON or multipart/form-data; one dependency reads either
and hands the route a `Body`: its request model (service.schemas), validated, and the image bytes it carries.

    def from_json(data: dict, settings) -> Body: ...    # the endpoint's reading of a JSON object
    def from_form(form: Form, settings) -> Body: ...    # and of a multipart form
    ClassifyBody = Annotated[Body[S.ClassifyRequest], Depends(request_body(from_json, from_form))]

Hostile bodies are refused here, before a model, the engine or a renderer sees them: JSON goes through pydantic's
parser (no nesting over 200 deep, lone surrogates, NaN or invalid UTF-8), arrays and objects over a size are refused
before validation, multipart text must be valid text, form numbers are as strict as JSON ones, and fields nobody reads
are refused either way.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ApiError, echo, summarise
from ..images import decode_base64
from ..settings import ServiceSettings
from .deps import SettingsDep

# Most entries of any JSON array or object within the depth our models read (more is refused before validation:
# pydantic would build one error per entry, ~30 s and 4 GB for 4 M of them). Raised to the label and image limits.
MAX_JSON_ENTRIES = 4096
UPLOAD_FIELDS = ("file", "image")  # the multipart field of one image: README's `curl -F image=@cat.png` works too
_FORM_INT = re.compile(r"[+-]?[0-9]{1,18}")

M = TypeVar("M", bound=BaseModel)
Image = tuple[str, bytes]  # (what a refusal calls it: "image", "images[2]", a gallery id; the encoded image)
Upload = tuple[str, bytes]  # (file name, content) of a multipart file part


@dataclass(frozen=True)
class Body(Generic[M]):
    """What an endpoint gets from its body."""

    model: M | None  # the request, validated; None only for a multipart gallery upload (its fields are the ids)
    images: list[Image] = field(default_factory=list)  # in the order sent
    many: bool = False  # the images came as a list: the answer is a list too


def request_body(from_json: Callable[[dict, ServiceSettings], Body], from_form: Callable[[Form, ServiceSettings], Body]):
    """The dependency of one endpoint's body: reads JSON or multipart and gives it to that endpoint's reader."""

    async def read_body(request: Request, settings: SettingsDep) -> Body:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            return from_json(json_object(await request.body(), settings), settings)
        if ctype == "multipart/form-data":
            return from_form(await read_form(request, settings), settings)
        raise ApiError(415, "unsupported_media_type", "send application/json (base64 image) or multipart/form-data (file upload)")

    return read_body


def validate(model: type[M], data: dict) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, "validation_error", summarise(e.errors(include_url=False, include_input=False))) from None


def json_image(image: str | None) -> list[Image]:
    """The image of a one-image JSON request (base64 in `image`), if it has one."""
    return [] if image is None else [("image", decode_base64(image))]


def too_many_images(count: str, settings: ServiceSettings) -> ApiError:
    return ApiError(422, "too_many_images", f"too many images: {count}; at most {settings.max_images_per_request} "
                    "per request (KEEPCLIP_MAX_IMAGES_PER_REQUEST)")


def check_image_count(count: int, settings: ServiceSettings) -> None:
    if count > settings.max_images_per_request:
        raise too_many_images(str(count), settings)


# ----------------------------------------------------------------------------- JSON
def json_object(raw: bytes, settings: ServiceSettings) -> dict[str, Any]:
    """pydantic's parser refuses what json.loads lets through: nesting over 200 deep (json.loads: RecursionError),
    lone surrogates (unrenderable in any reply), NaN/Infinity, invalid UTF-8."""
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({echo(str(e))})") from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "the JSON body must be an object")
    _check_entries(data, max(MAX_JSON_ENTRIES, settings.max_labels, settings.max_images_per_request))
    return data


def _check_entries(data: dict, cap: int) -> None:
    """Refuses arrays and objects of over `cap` entries where the request models iterate (the body, its values, their
    items): pydantic reports each bad entry on its own, ~30 s and 4 GB for 4 M of them. Deeper ones fail as one error."""
    level: list[tuple[str, dict | list]] = [("", data)]
    for depth in range(3):
        below = []
        for where, value in level:
            if len(value) > cap:
                raise ApiError(422, "validation_error", f"{where or 'body'}: {len(value)} entries; at most {cap} are accepted")
            if depth < 2:
                entries = value.items() if isinstance(value, dict) else enumerate(value)
                below += [(f"{where}.{echo(str(k), 40)}".lstrip("."), v) for k, v in entries if isinstance(v, (dict, list))]
        level = below


# ----------------------------------------------------------------------------- multipart
async def read_form(request: Request, settings: ServiceSettings) -> Form:
    try:
        form = await request.form(max_files=settings.max_images_per_request, max_fields=1000, max_part_size=settings.max_body_bytes)
    except StarletteHTTPException as e:
        if "too many files" in str(e.detail).lower():  # Starlette's 400: answer like a JSON list that is too long
            raise too_many_images(f"more than {settings.max_images_per_request}", settings) from None
        raise
    fields: dict[str, list[str]] = {}
    files: dict[str, list[Upload]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.setdefault(key, []).append((value.filename or "", await value.read()))
        else:
            fields.setdefault(key, []).append(value)
    await form.close()
    _check_form_text(fields, files)
    return Form(fields, files)


def _check_form_text(fields: dict[str, list[str]], files: dict[str, list[Upload]]) -> None:
    """Form text decoded with the client's charset (utf-7, unicode_escape, ...) may hold lone surrogates, which no
    reply can carry: refuse them here, like the JSON parser does."""
    texts = [*fields, *files, *(v for vs in fields.values() for v in vs), *(name for vs in files.values() for name, _ in vs)]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_request", "a multipart field name or value is not valid text (lone surrogates)") from None


class Form:
    """A multipart body's text fields and file parts by name. A reader takes what it knows; `finish` refuses the rest
    and validates what was taken against the request model."""

    def __init__(self, fields: dict[str, list[str]], files: dict[str, list[Upload]]):
        self.fields, self.files = fields, files

    def one(self, name: str) -> str | None:
        values = self.fields.pop(name, None)
        if values is None:
            return None
        if len(values) != 1:
            raise ApiError(422, "validation_error", f"form field '{name}' given {len(values)} times")
        return values[0]

    def all(self, name: str) -> list[str] | None:
        return self.fields.pop(name, None)

    def integer(self, name: str) -> int | None:
        """Decimal digits only, as strict as the JSON field (no 'true', '1.0', '1e3')."""
        value = self.one(name)
        if value is None:
            return None
        if not _FORM_INT.fullmatch(value.strip()):
            raise ApiError(422, "validation_error", f"{name}: must be an integer of at most 18 digits, not '{echo(value, 20)}'")
        return int(value)

    def number(self, name: str) -> float | None:
        """A finite number (float() would take 'nan' and 'inf')."""
        value = self.one(name)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ApiError(422, "validation_error", f"{name}: must be a finite number, not '{echo(value, 20)}'")
        return number

    def take_files(self, names: tuple[str, ...]) -> dict[str, list[Upload]]:
        """The file parts sent under `names`, by name in that order; text sent under one of them is refused."""
        if text := [name for name in names if name in self.fields]:
            raise ApiError(422, "validation_error", f"'{text[0]}' must be a file upload (curl -F {text[0]}=@cat.png), not text")
        return {name: self.files.pop(name) for name in names if name in self.files}

    def image(self) -> list[Image]:
        """The image of a one-image request, in `file` or `image`, if it has one."""
        got = [upload for uploads in self.take_files(UPLOAD_FIELDS).values() for upload in uploads]
        if len(got) > 1:
            raise ApiError(422, "validation_error", f"send one image, in 'file' or 'image' (got {len(got)})")
        return [("image", data) for _, data in got]

    def refuse_rest(self) -> None:
        extra = sorted(set(self.fields) | set(self.files))
        if extra:
            shown = ", ".join(echo(name, 40) for name in extra[:5])
            raise ApiError(422, "validation_error", f"unknown form field(s): {shown}{', ...' if len(extra) > 5 else ''}")

    def finish(self, model: type[M], values: dict[str, Any]) -> M:
        """The request model of the fields taken (`values`, None where absent), once nothing else was sent."""
        self.refuse_rest()
        return validate(model, {k: v for k, v in values.items() if v is not None})
