"""A hostile client against the real app (tiny engine, real store): a generated corpus of >= 300 bad requests over
every endpoint gets no 5xx, no hang, and a JSON `{"error": {"code", "message"}}` for every 4xx; the specific
failures an outside trial found (deep nesting, lone surrogates, loose types, echoed names, HEAD, the `image`
upload field) each have their own test."""
from __future__ import annotations

import json
import logging
import time

import pytest

from tests.unit.service.conftest import color_png, png
from tests.unit.service.test_api import b64, colors_client, error, png_header_size

AUTH = {"Authorization": "Bearer s3cret"}
JSON = {"content-type": "application/json"}
SURROGATE = '"\\ud800"'  # a lone surrogate, escaped as a client would send it in JSON text
MAX_MESSAGE = 1000  # error messages stay short, whatever the client sent


@pytest.fixture(scope="module")
def ro_client(tmp_path_factory, tiny_checkpoint, task_maker):
    """The app over a store with the red and green tasks; server errors come back as responses (500s), not raised."""
    with colors_client(tmp_path_factory, tiny_checkpoint, task_maker, raise_server_exceptions=False) as c:
        yield c


def _ok_bodies() -> dict[str, tuple[str, dict]]:
    """A valid JSON body per POST endpoint: (path, body); each hostile variant starts from one of these."""
    image = b64(png())
    return {
        "classify": ("/v1/classify", {"image": image, "labels": ["cat", "dog"], "top_k": 2}),
        "embed": ("/v1/embed", {"image": image, "task": "red", "weight": 0.5}),
        "embed-text": ("/v1/embed", {"text": ["a cat"], "task": "red", "weight": 1.0}),
        "gallery": ("/v1/gallery", {"items": [{"id": "a", "image": image}]}),
        "search": ("/v1/search", {"text": "a cat", "top_k": 3}),
        "rollback": ("/v1/tasks/red/rollback", {"version": 1}),
    }


def _req(method: str, path: str, **kwargs) -> tuple[str, str, dict]:
    if path.startswith("/v1/tasks/") and method in ("DELETE", "POST"):
        kwargs["headers"] = {**AUTH, **kwargs.get("headers", {})}
    return method, path, kwargs


def _raw_json_bodies(valid: bytes) -> list[bytes]:
    """Malformed, truncated, hostile-literal and hostile-encoding bodies."""
    deep = b"[" * 1000 + b"]" * 1000
    bodies = [valid[:n] for n in (0, 1, 2, len(valid) // 3, len(valid) // 2, len(valid) - 1)]
    bodies += [b" ", b"null", b"[]", b"1", b'"text"', b"true", b"{}", b"{,}", b"{'a': 1}", b'{"a" 1}']
    bodies += [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}', b"NaN"]
    bodies += [deep, b'{"x": ' + deep + b"}", b"{" * 500, b'{"x": ' + b"[" * 190 + b"]" * 190 + b"}"]
    bodies += [b'{"x": "\xff\xfe"}', b"\xef\xbb\xbf" + valid, b"\xff" + valid, valid.replace(b"{", b"{\x00", 1)]
    bodies += [b'{"x": ' + SURROGATE.encode() + b"}", b"{" + SURROGATE.encode() + b": 1}", valid.decode("latin-1").encode("utf-16")]
    bodies += [b'{"x": 1e400}', b'{"x": ' + b"9" * 5000 + b"}", b'{"x": -1e400}', valid + valid, valid + b"garbage"]
    return bodies


WRONG_VALUES = [True, False, None, 0, -1, 1.5, 2**63, 10**30, 1e308, "", "x" * 100_000, "5", [], {}, [[]], [None],
                ["\x00"], "\x00", "../../etc/passwd", "😀" * 50]


def _field_cases(ok: dict) -> list[tuple[str, str, dict]]:
    """Every wrong value in every field of every endpoint (including the gallery item's fields), and raw
    JSON text with a lone surrogate or a NaN literal in that field."""
    cases = []
    for name, (path, body) in ok.items():
        fields = [(k, None) for k in body] + ([("items", "id"), ("items", "image")] if name == "gallery" else [])
        for field, sub in fields:
            for value in WRONG_VALUES:
                changed = json.loads(json.dumps(body))
                if sub:
                    changed[field][0][sub] = value
                else:
                    changed[field] = value
                cases.append(_req("POST", path, content=json.dumps(changed).encode(), headers=JSON))
            for literal in (SURROGATE, "NaN", f"[{SURROGATE}]"):
                raw = json.dumps({**body, field: "@@"}).replace('"@@"', literal)
                cases.append(_req("POST", path, content=raw.encode(), headers=JSON))
    return cases


def _multipart_cases() -> list[tuple[str, str, dict]]:
    image, bad = png(), b"%PDF-1.4 not an image"
    files = lambda data: {"file": ("x.png", data, "image/png")}  # noqa: E731
    cases = []
    for path in ("/v1/classify", "/v1/embed", "/v1/search"):
        cases += [
            _req("POST", path, files=files(bad)), _req("POST", path, files=files(b"")), _req("POST", path, files=files(image[:40])),
            _req("POST", path, files=files(png_header_size(100_000, 100_000))), _req("POST", path, files=files(png_header_size(0, 9))),
            _req("POST", path, files={"file": ("x", image), "image": ("y", image)}), _req("POST", path, files={"image": (None, "not a file")}),
            _req("POST", path, files=[("file", ("a", image)), ("file", ("b", image))]), _req("POST", path, files={"other": ("x", image)}),
            _req("POST", path, files=files(image), data={"unknown": "1"}), _req("POST", path, files=files(image), data={"x" * 100_000: "1"}),
            _req("POST", path, content=b"--xx\r\nnope", headers={"content-type": "multipart/form-data; boundary=xx"}),
            _req("POST", path, content=b"abc", headers={"content-type": "multipart/form-data"}),
            _req("POST", path, content=_utf7_part("task"), headers={"content-type": "multipart/form-data; boundary=b; charset=utf-7"}),
        ]
    for top_k in ("abc", "1e3", "nan", "true", "-1", "0", "9" * 5000, "", " 2 ", "2.0", "\x00"):
        cases.append(_req("POST", "/v1/classify", files=files(image), data={"top_k": top_k}))
        cases.append(_req("POST", "/v1/search", files=files(image), data={"top_k": top_k}))
    for weight in ("nan", "inf", "-0.5", "2", "1e400", "x", ""):
        cases.append(_req("POST", "/v1/embed", files=files(image), data={"weight": weight}))
    for labels in (",,", ",".join(["a"] * 10_000), "a," + "b" * 5000, "\x00", "x,x"):
        cases.append(_req("POST", "/v1/classify", files=files(image), data={"labels": labels}))
    for task in ("../x", "x" * 100_000, "RED", "\x00", "nope"):
        cases.append(_req("POST", "/v1/classify", files=files(image), data={"task": task}))
    cases += [
        _req("POST", "/v1/gallery", files=[("files", ("a.png", image))], data={"ids": ["a", "b"]}),
        _req("POST", "/v1/gallery", files=[("files", ("", image))]), _req("POST", "/v1/gallery", files=[("files", ("a", bad))]),
        _req("POST", "/v1/gallery", files=[("files", ("x" * 1000, image))]), _req("POST", "/v1/gallery", files={"ids": (None, "a")}),
        _req("POST", "/v1/gallery", files=[("files", ("a", image)), ("images", ("b", image))]),
        _req("POST", "/v1/tasks/red/rollback", headers=AUTH, files={"version": (None, "true")}),
        _req("POST", "/v1/tasks/red/rollback", headers=AUTH, files=[("version", (None, "1")), ("version", (None, "2"))]),
        _req("POST", "/v1/tasks/red/rollback", headers=AUTH, files={"version": (None, "1"), "file": ("a", b"x")}),
    ]
    return cases


def _utf7_part(field: str) -> bytes:
    """A multipart body whose field decodes (charset=utf-7) to a lone surrogate."""
    return (f'--b\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n+2AA-\r\n'
            '--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n').encode() + png() + b"\r\n--b--\r\n"


def _base64_cases() -> list[tuple[str, str, dict]]:
    values = ["not base64 !!", "A", "AAA", "====", "data:image/png;base64,", "data:text/html;base64," + b64(b"<html>"),
              "data:;base64," + b64(png()), b64(b"GIF89a"), b64(png()[:60]), b64(png_header_size(100_000, 100_000)),
              b64(png())[:-3], " \n\t ", "\u00e9" * 10, b64(b"\x00" * 50_000), b64(png()).replace("A", "-")]
    cases = []
    for value in values:
        cases.append(_req("POST", "/v1/classify", json={"image": value}))
        cases.append(_req("POST", "/v1/embed", json={"image": value}))
        cases.append(_req("POST", "/v1/search", json={"image": value}))
        cases.append(_req("POST", "/v1/gallery", json={"items": [{"id": "a", "image": value}]}))
    return cases


def _path_and_header_cases() -> list[tuple[str, str, dict]]:
    names = ["..%2F..%2Fetc%2Fpasswd", "..", ".", "%00", "a" * 65, "x" * 60_000, "%C3%84rger", "%ED%A0%80", "%FF", "con",
             "-x", "red%20", "RED", "red%0a", "%252e%252e", "red;rm", "~root"]
    cases = []
    for name in names:
        cases += [_req("GET", f"/v1/tasks/{name}"), _req("DELETE", f"/v1/tasks/{name}"),
                  _req("POST", f"/v1/tasks/{name}/rollback", json={"version": 1})]
    for path in ("/v1/classify", "/v1/embed", "/v1/gallery", "/v1/search", "/v1/tasks", "/v1/tasks/red", "/healthz", "/metrics"):
        cases += [_req(m, path) for m in ("PUT", "PATCH", "OPTIONS")]
        cases.append(_req("GET" if not path.startswith("/v1/") or "tasks" in path else "POST", path + "?top_k=abc&task=../x&%ff=%ff&" + "q=1&" * 500,
                          json={"text": "x"} if path in ("/v1/embed", "/v1/search") else None))
    cases += [_req("GET", p) for p in ("/v1/nothing", "/v1/tasks/a/b", "/../../etc/passwd", "/v1/" + "x" * 10_000, "/%00")]
    for length in ("abc", "-1", "9" * 5000, "", "1 1", "0x10"):
        cases.append(_req("POST", "/v1/search", content=b'{"text": "x"}', headers={**JSON, "content-length": length}))
    for auth in ("Bearer", "Bearer ", "Basic czNjcmV0", "Bearer " + "x" * 10_000, "Bearer s3cret s3cret", "bearer\x7f"):
        cases.append(("DELETE", "/v1/tasks/nope", {"headers": {"Authorization": auth}}))
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml", "", "application/json; charset=utf-16",
                  "image/png", "multipart/mixed; boundary=x", "application/json-patch", "*/*"):
        for path in ("/v1/classify", "/v1/embed", "/v1/gallery", "/v1/search", "/v1/tasks/red/rollback"):
            cases.append(_req("POST", path, content=b'{"text": "x"}', headers={"content-type": ctype}))
    return cases


def hostile_corpus() -> list[tuple[str, str, dict]]:
    ok = _ok_bodies()
    cases = []
    for path, body in ok.values():
        cases += [_req("POST", path, content=raw, headers=JSON) for raw in _raw_json_bodies(json.dumps(body).encode())]
    return cases + _field_cases(ok) + _multipart_cases() + _base64_cases() + _path_and_header_cases()


@pytest.mark.timeout(600)
def test_a_hostile_corpus_gets_json_4xx_never_5xx_nor_a_hang(ro_client, caplog):
    corpus = hostile_corpus()
    assert len(corpus) >= 300
    failures, slowest = [], 0.0
    with caplog.at_level(logging.ERROR):
        for method, path, kwargs in corpus:
            start = time.perf_counter()
            response = ro_client.request(method, path, **{k: v for k, v in kwargs.items() if v is not None})
            slowest = max(slowest, time.perf_counter() - start)
            problem = _problem(method, response)
            if problem:
                failures.append(f"{method} {path[:60]} {str(kwargs)[:160]} -> {problem}")
    assert not failures, f"{len(failures)} of {len(corpus)} failed:\n" + "\n".join(failures[:30])
    assert slowest < 10, f"a request took {slowest:.1f} s"
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    assert ro_client.post("/v1/classify", json={"image": b64(color_png("green"))}).json()["task"] == "green"


def _problem(method: str, response) -> str | None:
    """What is wrong with a response to a hostile request, or None."""
    if response.status_code >= 500:
        return f"{response.status_code} {response.text[:200]}"
    if response.status_code < 400 or method == "HEAD":
        return None
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} not JSON: {response.text[:200]}"
    if not (isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == {"code", "message"}):
        return f"{response.status_code} not an error body: {response.text[:200]}"
    if len(body["error"]["message"]) > MAX_MESSAGE:
        return f"{response.status_code} message of {len(body['error']['message'])} characters"
    return None


# ----------------------------------------------------------------------------- the trial's findings, one by one
def test_json_nested_1000_deep_is_a_400(ro_client):
    deep = b'{"image": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    for path in ("/v1/classify", "/v1/embed", "/v1/gallery", "/v1/search"):
        assert "JSON" in error(ro_client.post(path, content=deep, headers=JSON), 400, "invalid_json")


@pytest.mark.parametrize("path, body", [
    ("/v1/classify", '{"image": "%s", "labels": [%s, "dog"]}'),
    ("/v1/classify", '{"image": "%s", "task": %s}'),
    ("/v1/embed", '{"image": "%s", "task": %s}'),
    ("/v1/embed", '{"image": "%s", "text": [%s]}'),
    ("/v1/gallery", '{"items": [{"image": "%s", "id": %s}]}'),
])
def test_lone_surrogates_are_a_400_and_nothing_is_logged(ro_client, caplog, path, body):
    raw = (body % (b64(png()), SURROGATE)).encode()
    with caplog.at_level(logging.WARNING):
        assert "JSON" in error(ro_client.post(path, content=raw, headers=JSON), 400, "invalid_json")
    assert not caplog.records


def test_a_multipart_field_that_decodes_to_a_lone_surrogate_is_a_400(ro_client):
    headers = {"content-type": "multipart/form-data; boundary=b; charset=utf-7"}
    for field in ("task", "labels"):
        error(ro_client.post("/v1/classify", content=_utf7_part(field), headers=headers), 400, "bad_request")


@pytest.mark.parametrize("path, body", [
    ("/v1/tasks/red/rollback", {"version": True}),
    ("/v1/tasks/red/rollback", {"version": 1.0}),
    ("/v1/tasks/red/rollback", {"version": "1"}),
    ("/v1/classify", {"top_k": True}),
    ("/v1/classify", {"top_k": "2"}),
    ("/v1/classify", {"top_k": 2.0}),
    ("/v1/search", {"text": "x", "top_k": True}),
    ("/v1/embed", {"text": "x", "weight": True}),
    ("/v1/embed", {"text": "x", "weight": "0.5"}),
])
def test_types_are_strict(ro_client, path, body):
    if path == "/v1/classify":
        body = {"image": b64(color_png("red")), **body}
    message = error(ro_client.post(path, json=body, headers=AUTH), 422, "validation_error")
    assert next(iter(set(body) - {"image", "text"})) in message


def test_loose_form_numbers_are_refused_but_form_strings_of_numbers_work(ro_client):
    files = {"file": ("r.png", color_png("red"), "image/png")}
    assert len(ro_client.post("/v1/classify", files=files, data={"top_k": "1"}).json()["scores"]) == 1
    assert ro_client.post("/v1/embed", files=files, data={"weight": "0.25", "task": "red"}).json()["weight"] == 0.25
    for top_k in ("true", "1.0", "1e1", "nan"):
        assert "top_k" in error(ro_client.post("/v1/classify", files=files, data={"top_k": top_k}), 422, "validation_error")
    for weight in ("nan", "inf", "true"):
        assert "weight" in error(ro_client.post("/v1/embed", files=files, data={"weight": weight}), 422, "validation_error")
    form = {"version": (None, "true")}  # a text field of a multipart body
    assert "version" in error(ro_client.post("/v1/tasks/red/rollback", files=form, headers=AUTH), 422)


def test_echoed_names_are_truncated(ro_client):
    long = "x" * 100_000
    image = b64(png())
    responses = [
        (ro_client.get(f"/v1/tasks/{long[:60_000]}"), 404), (ro_client.delete(f"/v1/tasks/{long[:60_000]}", headers=AUTH), 404),
        (ro_client.post(f"/v1/tasks/{long[:60_000]}/rollback", json={"version": 1}, headers=AUTH), 404),
        (ro_client.post("/v1/classify", json={"image": image, "task": long}), 404),
        (ro_client.post("/v1/embed", json={"text": "a", "task": long}), 404),
        (ro_client.post("/v1/classify", json={"image": image, long: 1}), 422),
        (ro_client.post("/v1/classify", files={"file": ("a.png", png())}, data={long[:200]: "1"}), 422),
        (ro_client.post("/v1/gallery", files=[("files", ("a.png", b"nope"))], data={"ids": ["y" * 250]}), 422),
    ]
    for response, status in responses:
        message = error(response, status)
        assert len(message) < 400 and "\u2026" in message, message


def test_head_answers_like_get_without_a_body(ro_client):
    for path in ("/healthz", "/v1/tasks", "/v1/tasks/red", "/metrics", "/openapi.json"):
        get, head = ro_client.get(path), ro_client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert ro_client.head("/v1/tasks/nope").status_code == 404
    assert ro_client.head("/v1/classify").status_code == 405
    metrics = ro_client.get("/metrics").text
    assert 'keepclip_requests_total{endpoint="/healthz",method="HEAD",status="200"}' in metrics


@pytest.mark.parametrize("path, extra", [("/v1/classify", {}), ("/v1/embed", {}), ("/v1/search", {"top_k": "1"})])
def test_the_upload_field_may_be_called_image_or_file(ro_client, path, extra):
    by_file = ro_client.post(path, files={"file": ("r.png", color_png("red"), "image/png")}, data=extra)
    by_image = ro_client.post(path, files={"image": ("r.png", color_png("red"), "image/png")}, data=extra)
    assert by_file.status_code == by_image.status_code == 200 and by_file.json() == by_image.json()
    both = ro_client.post(path, files={"file": ("r.png", png()), "image": ("r.png", png())}, data=extra)
    assert "one image" in error(both, 422, "validation_error")
    text = ro_client.post(path, files={"image": (None, "cat.png"), **{k: (None, v) for k, v in extra.items()}})
    assert "file upload" in error(text, 422, "validation_error")


def test_gallery_takes_image_uploads_too(ro_client):
    added = ro_client.post("/v1/gallery", files=[("image", ("up-1.png", color_png("red")))]).json()
    assert added["added"] == ["up-1.png"]
    added = ro_client.post("/v1/gallery", files=[("images", ("a.png", png())), ("images", ("b.png", png()))], data={"ids": ["i1", "i2"]}).json()
    assert added["added"] == ["i1", "i2"]
    mixed = ro_client.post("/v1/gallery", files=[("files", ("a.png", png())), ("image", ("b.png", png()))])
    error(mixed, 422, "validation_error")


def test_too_many_labels_names_the_limit(ro_client):
    labels = [f"l{i}" for i in range(9)]  # LIMITS in test_api: max_labels = 8
    message = error(ro_client.post("/v1/classify", json={"image": b64(png()), "labels": labels}), 422, "validation_error")
    assert "9" in message and "8" in message and "KEEPCLIP_MAX_LABELS" in message


def test_huge_arrays_are_refused_before_validation(ro_client):
    body = b'{"image": "AAAA", "labels": [' + b"1," * 100_000 + b'1], "colour": 1}'
    start = time.perf_counter()
    message = error(ro_client.post("/v1/classify", content=body, headers=JSON), 422, "validation_error")
    assert "labels: 100001 entries" in message and "4096" in message and time.perf_counter() - start < 1
    wide = json.dumps({"items": [{"id": "a", "image": "AAAA", **{f"k{i}": 0 for i in range(5000)}}]})
    assert "items.0: 5002 entries" in error(ro_client.post("/v1/gallery", content=wide, headers=JSON), 422)


def test_only_common_image_formats_are_decoded(ro_client):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "PCX")  # Pillow reads it, but the service need not
    message = error(ro_client.post("/v1/classify", files={"file": ("x.pcx", buf.getvalue())}), 422, "invalid_image")
    assert "PNG, JPEG" in message
