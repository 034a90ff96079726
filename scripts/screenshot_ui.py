"""Headless-Chromium screenshot of the Gradio UI at /ui showing a classification result -> docs/img/ui.png.

    python scripts/screenshot_ui.py                       # proxy backbone from ../shared, two hand-made tasks
    python scripts/screenshot_ui.py --backbone tiny       # no ../shared needed (random tiny CLIP, colour tasks)
    python scripts/screenshot_ui.py --url http://127.0.0.1:8000 --image cat.png   # an already running service

Needs Debian's chromium (`apt-get install -y chromium`) and the Python `playwright` package (dev extra); it never
runs `playwright install`. Without --url it starts a local Ray cluster and the Serve application, then stops them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def capture(url: str, image: Path, out: Path, timeout_s: float = 90.0) -> str:
    """Open {url}/ui/, upload `image`, click Classify, wait for the top-5, save a screenshot. -> the route text."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no chromium found: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 720}, device_scale_factor=1)
            page.goto(f"{url.rstrip('/')}/ui/", wait_until="networkidle", timeout=timeout_s * 1000)
            page.locator("#classify-image input[type=file]").set_input_files(str(image))
            page.locator("#classify-image img").first.wait_for(timeout=timeout_s * 1000)
            page.locator("#classify-button").click()
            route = page.locator("#classify-route")
            route.get_by_text("Routed task").or_(route.get_by_text("No learned task")).first.wait_for(timeout=timeout_s * 1000)
            page.wait_for_timeout(500)  # let the label bars finish their transition
            text = route.inner_text()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            return text
        finally:
            browser.close()


def demo_service(backbone: str, root: Path):
    """Settings and a sample image for a local demo: a store with hand-made tasks for the chosen backbone."""
    import numpy as np
    from PIL import Image

    from backbone import PromptedCLIP, load_backbone
    from prompts_store import open_store
    from service.settings import ServiceSettings
    from testkit.tasks import color_sample, make_color_task, publish_domain_tasks, save_checkpoint

    store = open_store(root / "store")
    if backbone == "proxy":
        model_json = SHARED / "models" / "proxy-clip" / "proxy-clip.json"
        weights = SHARED / "models" / "proxy-clip" / "proxy-clip.safetensors"
        if not weights.is_file():
            sys.exit(f"no proxy model at {weights}; use --backbone tiny")
        maker = PromptedCLIP(load_backbone(str(model_json), str(weights), "cpu"))
        publish_domain_tasks(maker, store, SHARED / "data", ["cifar10", "eurosat"], n=300, prompt_scale=0.0)
        test = np.load(SHARED / "data" / "cifar10" / "test.npz")
        names = json.loads((SHARED / "data" / "cifar10" / "classnames.json").read_text())
        pick = int(np.flatnonzero(test["labels"] == names.index("airplane"))[0]) if "airplane" in names else 0
        sample = Image.fromarray(test["images"][pick]).resize((224, 224), Image.BICUBIC)
    else:
        sys.path.insert(0, str(REPO))
        from tests.conftest import TINY_CONFIGS, tiny_backbone

        model_json = TINY_CONFIGS / "keepclip-tiny-a.json"
        weights = save_checkpoint(tiny_backbone(), root / "tiny.safetensors")
        maker = PromptedCLIP(load_backbone(str(model_json), str(weights), "cpu"))
        for name in ("red", "green", "blue"):
            store.publish(make_color_task(maker, name))
        sample = Image.fromarray(color_sample("red", 1)[0]).resize((224, 224), Image.NEAREST)
    image = root / "sample.png"
    sample.save(image)
    settings = ServiceSettings(model=str(model_json), pretrained=str(weights), device="cpu", store=str(root / "store"), ui=True)
    return settings, image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="screenshot this running service instead of starting one")
    parser.add_argument("--image", type=Path, help="image to classify (default: a sample for the demo store)")
    parser.add_argument("--backbone", choices=("proxy", "tiny"), default="proxy")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "ui.png")
    args = parser.parse_args(argv)
    if args.url:
        if args.image is None:
            parser.error("--image is needed with --url")
        print(capture(args.url, args.image, args.out))
        return 0
    import ray
    from ray import serve

    from service.app import run_service

    with tempfile.TemporaryDirectory() as tmp:
        settings, image = demo_service(args.backbone, Path(tmp))
        settings = settings.model_copy(update={"port": args.port})
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            url = run_service(settings, blocking=False)
            print(capture(url, args.image or image, args.out))
            print(f"saved {args.out}")
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
