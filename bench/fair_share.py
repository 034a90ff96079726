"""Fair share: how long does a one-image client wait while other clients send costly requests within every limit?

    python -m bench.fair_share --url http://127.0.0.1:8000        # against a running `keepclip serve`

For each kind of costly request (64 images; one image with 256 labels never seen before; an embedding of 256 texts of
about 1,000 characters), `--clients` threads send it in a loop for `--seconds`, and one more client sends one small
image at a time. Printed per kind: the one-image client's requests, p50 and max latency, and how many costly
requests were answered. A service that serves requests in arrival order makes the one client wait for everything
queued before it; keepclip's batches take the queued requests' images in turn and its text calls run one at a time
(docs/service.md, "Fair share").
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image

COSTLY = {
    "64 images": lambda c, image, rnd: c.post("/v1/classify", json={"images": [image] * 64}),
    "1 image + 256 new labels": lambda c, image, rnd: c.post(
        "/v1/classify", json={"image": image, "labels": [f"{rnd.random():.16f} " * 8 for _ in range(256)]}),
    "embed 256 texts": lambda c, image, rnd: c.post(
        "/v1/embed", json={"text": [f"text {rnd.random()} " * 50 for _ in range(256)]}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fair_share", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running service [%(default)s]")
    p.add_argument("--clients", type=int, default=20, help="clients sending the costly request [%(default)s]")
    p.add_argument("--seconds", type=float, default=20.0, help="per kind of costly request [%(default)s]")
    p.add_argument("--kinds", nargs="+", default=list(COSTLY), choices=list(COSTLY), help="costly requests to try")
    return p.parse_args(argv)


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def trial(url: str, send, clients: int, seconds: float) -> dict:
    """`clients` threads send the costly request until the time is up; one client sends one image at a time."""
    png = small_png()
    image, stop, waits, answered = base64.b64encode(png).decode(), time.monotonic() + seconds, [], []

    def one_image_client():
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                started = time.monotonic()
                r = c.post("/v1/classify", files={"image": ("a.png", png, "image/png")})
                r.raise_for_status()
                waits.append(time.monotonic() - started)

    def costly_client(seed: int):
        rnd = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                answered.append(send(c, image, rnd).status_code)

    threads = [threading.Thread(target=costly_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1)  # the costly requests queue first
    one_image_client()
    for t in threads:
        t.join()
    waits.sort()
    return {"requests": len(waits), "p50_s": round(waits[len(waits) // 2], 3), "max_s": round(waits[-1], 3),
            "costly_answered": len(answered), "costly_statuses": sorted(set(answered))}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    for kind in args.kinds:
        results[kind] = r = trial(args.url, COSTLY[kind], args.clients, args.seconds)
        print(f"{kind:26s} one-image client: {r['requests']} requests, p50 {r['p50_s']:.2f} s, max {r['max_s']:.2f} s; "
              f"costly requests answered {r['costly_answered']} {r['costly_statuses']}", flush=True)
    print(json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
