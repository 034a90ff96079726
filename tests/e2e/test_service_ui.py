"""The Gradio UI at /ui in headless Chromium: upload, Classify, a routed task and top-5 appear (skips without chromium)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO
from tests.e2e.test_service_hotswap import color_png

spec = importlib.util.spec_from_file_location("screenshot_ui", REPO / "scripts" / "screenshot_ui.py")
screenshot_ui = importlib.util.module_from_spec(spec)
sys.modules.setdefault("screenshot_ui", screenshot_ui)
spec.loader.exec_module(screenshot_ui)


@pytest.mark.skipif(screenshot_ui.chromium_path() is None, reason="needs chromium (apt-get install -y chromium)")
def test_ui_classifies_an_upload(keepclip_service, tmp_path):
    pytest.importorskip("playwright", reason="needs the playwright package (dev extra)")
    image = tmp_path / "red.png"
    image.write_bytes(color_png("red"))
    out = tmp_path / "ui.png"
    route = screenshot_ui.capture(keepclip_service.url, image, out)
    assert "Routed task" in route and "red" in route
    assert out.stat().st_size > 10_000


@pytest.mark.skipif(screenshot_ui.chromium_path() is None, reason="needs chromium (apt-get install -y chromium)")
def test_docs_page_renders_offline_in_chromium(keepclip_service, tmp_path):
    """/docs draws Swagger UI from the app's own files: requests to any other host are blocked, and it still renders."""
    pytest.importorskip("playwright", reason="needs the playwright package (dev extra)")
    from playwright.sync_api import sync_playwright

    url = keepclip_service.url.rstrip("/")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=screenshot_ui.chromium_path(), args=screenshot_ui.CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            outside = []
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else (outside.append(route.request.url), route.abort()))
            page.goto(f"{url}/docs", wait_until="networkidle", timeout=90_000)
            page.get_by_text("/v1/classify").first.wait_for(timeout=60_000)  # an operation drawn by Swagger UI
            page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        finally:
            browser.close()
    assert outside == [] and (tmp_path / "docs.png").stat().st_size > 10_000
