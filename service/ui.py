"""Gradio UI at /ui, built on the replica (a mounted Gradio app cannot be pickled into a Serve deployment).

Tabs: classify an upload (routed task, gate, top-5), zero-shot with free labels, text search over the gallery,
and the list of tasks. The callbacks call the engine directly (Gradio runs them in worker threads).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from .engine import Engine
from .errors import ApiError
from .images import decode_image, decoding_budget
from .settings import ServiceSettings

TITLE = "keepclip"
TASK_COLUMNS = ["task", "version", "kind", "classes", "accuracy % (test, else val)", "zero-shot %", "class names", "created"]
# small images (28x28 digits) are drawn scaled up to the box, with sharp pixels, instead of at native size
CSS = ".keepclip-image img { width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }"


def _pct(metrics, key: str) -> float | None:
    value = metrics.get(key) if metrics else None
    return round(100 * value, 1) if isinstance(value, (int, float)) else None


def task_rows(state) -> list[list]:
    """One row per served task (accuracy: the test figure add-task measured, else the validation one), then the refused."""
    rows = []
    for t in sorted(state.tasks.values(), key=lambda t: t.name):
        test = "test" if _pct(t.metrics, "test_accuracy") is not None else "val"
        names = ", ".join(t.class_names[:8]) + (" …" if len(t.class_names) > 8 else "")
        balanced = (t.metrics or {}).get("accuracy_measure") == "mean per-class recall"  # add-task --balance-classes
        kind = f"{t.kind} (per-class recall)" if balanced else t.kind
        rows.append([t.name, t.version, kind, len(t.class_names), _pct(t.metrics, f"{test}_accuracy"),
                     _pct(t.metrics, f"{test}_zero_shot_accuracy"), names, t.created_at or ""])
    rows += [[name, None, None, None, None, None, f"not served: {why[:120]}", ""]
             for name, why in sorted(state.errors.items()) if name not in state.tasks]
    return rows or [["(no tasks yet)", None, None, None, None, None, "", ""]]


def _prepare(engine: Engine, settings: ServiceSettings, path: str | None):
    """An uploaded file (Gradio hands over its path in the upload folder) decoded exactly as the API decodes a body:
    the same formats, and the pixel limit judged from the header before any pixel is decoded."""
    if path is None:
        raise gr.Error("Upload an image first.")
    try:
        return decode_image(Path(path).read_bytes(), settings.max_image_pixels, "image", decoding_budget(settings), engine.preprocess,
                            engine.reading)
    except ApiError as e:
        raise gr.Error(e.message) from None


def _route_text(r) -> str:
    if r.task is None:
        best = f" (closest: `{r.route.best}`, gate {r.route.best_gate:.3f})" if r.route.best else ""
        return f"**No learned task matches this image** — frozen CLIP{best}."
    return f"**Routed task:** `{r.task}` v{r.version}  ·  **gate** w = {r.gate:.3f}"


def build_ui(engine: Engine, settings: ServiceSettings) -> gr.Blocks:
    def classify(image):
        [r] = engine.classify([_prepare(engine, settings, image)], top_k=5)
        if not r.scores:
            return _route_text(r) + " Pass labels in the Zero-shot tab to classify it.", None
        return _route_text(r), {s.label: s.score for s in r.scores}

    def zero_shot(image, labels_text):
        labels = [part.strip() for part in (labels_text or "").split(",") if part.strip()]
        if not labels:
            raise gr.Error("Type some labels, separated by commas.")
        if len(labels) > settings.max_labels:
            raise gr.Error(f"At most {settings.max_labels} labels.")
        [r] = engine.classify([_prepare(engine, settings, image)], labels=list(dict.fromkeys(labels)), top_k=5)
        return _route_text(r), {s.label: s.score for s in r.scores}

    def search(text, k):
        if not text or not text.strip():
            raise gr.Error("Type a query.")
        hits = engine.search_text(text.strip()[:2000], int(k))
        if not hits:
            return [["(the gallery is empty: add images with POST /v1/gallery)", 0.0]]
        return [[i, round(s, 4)] for i, s in hits]

    def tasks():
        state = engine.state
        return task_rows(state), f"store generation {state.generation}"

    with gr.Blocks(title=TITLE, analytics_enabled=False) as ui:  # the CSS goes with mount_gradio_app (Gradio 6)
        gr.Markdown("## keepclip — one frozen CLIP, many learned tasks\nEach image is routed on its own to the task whose fingerprint it matches.")
        with gr.Tab("Classify"):
            with gr.Row():
                image = gr.Image(type="filepath", label="Image", elem_id="classify-image", elem_classes="keepclip-image", height=280)
                with gr.Column():
                    route = gr.Markdown(elem_id="classify-route")
                    top5 = gr.Label(num_top_classes=5, label="Top-5", elem_id="classify-label")
            gr.Button("Classify", variant="primary", elem_id="classify-button").click(classify, image, [route, top5])
        with gr.Tab("Zero-shot"):
            with gr.Row():
                zs_image = gr.Image(type="filepath", label="Image", elem_classes="keepclip-image", height=280)
                with gr.Column():
                    zs_labels = gr.Textbox(label="Labels (comma-separated)", placeholder="cat, dog, airplane")
                    zs_route = gr.Markdown()
                    zs_out = gr.Label(num_top_classes=5, label="Top-5")
            gr.Button("Classify with these labels", variant="primary").click(zero_shot, [zs_image, zs_labels], [zs_route, zs_out])
        with gr.Tab("Search"):
            with gr.Row():
                query = gr.Textbox(label="Text query", scale=4)
                k = gr.Slider(1, 50, value=5, step=1, label="top k", scale=1)
            hits = gr.Dataframe(headers=["id", "score"], label="Gallery matches")
            gr.Button("Search", variant="primary").click(search, [query, k], hits)
        with gr.Tab("Tasks"):
            table = gr.Dataframe(headers=TASK_COLUMNS, label="Tasks served")
            generation = gr.Markdown()
            gr.Button("Refresh").click(tasks, None, [table, generation])
            ui.load(tasks, None, [table, generation])
    return ui


def mount_ui(app: FastAPI, engine: Engine, settings: ServiceSettings, path: str = "/ui") -> FastAPI:
    ui = build_ui(engine, settings)
    # Gradio checks that a file named in an API call was uploaded by a client (not any path on the server) only once
    # `has_launched` is set, which `launch()` does and `mount_gradio_app` does not: without it a client could have any
    # server file copied to the cache and then download it (tests/unit/service/test_served_edges.py).
    ui.has_launched = True
    return gr.mount_gradio_app(app, ui, path=path, max_file_size=settings.max_body_bytes, css=CSS)
