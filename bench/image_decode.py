"""Image decoding: a large JPEG to the model's input, decoded whole or at reduced scale (Pillow's draft).

    python -m bench.image_decode                       # a 12-megapixel photo-like JPEG, ViT-B/16's and the proxy's transform

The service's own path is timed (`service.images.decode_image`, then the backbone's resize/crop as `PixelPipeline`
caches it), with and without the draft size, and the model inputs of both are compared. No model is loaded: the
transforms are open_clip's eval transforms for the sizes given.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.image_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=4000, help="JPEG width [4000]")
    p.add_argument("--height", type=int, default=3000, help="JPEG height [3000]")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality [90]")
    p.add_argument("--input-sizes", type=int, nargs="+", default=[224, 64], help="model input sizes [224 (ViT-B/16), 64 (proxy)]")
    p.add_argument("--rounds", type=int, default=10, help="decodes timed per variant [10]")
    return p.parse_args(argv)


def photo_like_jpeg(width: int, height: int, quality: int, seed: int = 0) -> bytes:
    """Smooth colour fields with sensor-like noise: compresses like a photo (about 3.9 MB at 12 MP, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def timed(decode, rounds: int) -> tuple[float, np.ndarray]:
    decode()  # warm
    started = time.perf_counter()
    for _ in range(rounds):
        pixels = decode()
    return (time.perf_counter() - started) / rounds * 1000, pixels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import open_clip

    from backbone import PixelPipeline
    from service.images import decode_image

    data = photo_like_jpeg(args.width, args.height, args.quality)
    rows = []
    for size in args.input_sizes:
        pipeline = PixelPipeline(open_clip.image_transform(size, is_train=False))
        whole_ms, whole = timed(lambda: decode_image(data, 10**9, then=pipeline.pixels), args.rounds)
        reduced_ms, reduced = timed(lambda: decode_image(data, 10**9, then=pipeline.pixels, reading=pipeline.reading), args.rounds)
        moved = np.abs(whole.astype(int) - reduced.astype(int))
        rows.append({"input_size": size, "draft_size": pipeline.reading.draft_size, "whole_ms": round(whole_ms, 1),
                     "reduced_ms": round(reduced_ms, 1), "speedup": round(whole_ms / reduced_ms, 2),
                     "max_grey_levels_moved": int(moved.max()), "mean_grey_levels_moved": round(float(moved.mean()), 3)})
    report = {"benchmark": "image_decode", "jpeg": {"width": args.width, "height": args.height, "bytes": len(data)}, "rows": rows}
    print(json.dumps(report, indent=2))
    print(f"\n| model input | JPEG {args.width}x{args.height} ({len(data) / 1e6:.1f} MB) decoded whole | at reduced scale | speed-up | input moved (max / mean grey levels) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input_size']} px (draft {r['draft_size']}) | {r['whole_ms']} ms | {r['reduced_ms']} ms | {r['speedup']}x | "
              f"{r['max_grey_levels_moved']} / {r['mean_grey_levels_moved']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
