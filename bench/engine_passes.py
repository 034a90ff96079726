"""The image-tower passes the engine runs for a batch routed to a prompt task, against plain zero-shot's one pass
(a benchmark, not a test). Works on any open_clip ViT, so that a deeper tower than the proxy's can be measured
without weights or data:

    python -m bench.engine_passes                                         # the proxy, depth 3 in the last blocks
    python -m bench.engine_passes --model ViT-B-16 --pretrained none --calls 6

For one batch of random images, every image routed to one task with random prompts (`--depth` blocks at the end of
each tower), under `torch.no_grad` like the service:

- **zero-shot**: plain open_clip `encode_image` on a backbone without wrappers;
- **shared bottom**: the frozen pass keeping the activations below the prompts (`encode_image_keeping`), then the
  prompted pass from there (`encode_image_from`): the engine before the pooled last block;
- **pooled**: the same two passes with the last block run for the pooled token only (`encode_image_pooled`,
  `encode_image_from(pooled=True)`): the engine now.

Calls are interleaved in rotating order (load changes on a shared machine hit all alike); the median per call is
reported, and zero-shot's median divided by each (the engine's tower cost as a ratio of plain zero-shot's, leaving
out decoding, routing and logits, which `bench.speed` includes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.prompt_branch import PROXY, machine


def run(args) -> dict:
    import torch

    from backbone import PromptConfig, PromptedCLIP, load_backbone

    torch.set_num_threads(args.threads)
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    plain = load_backbone(args.model, pretrained, "cpu").model
    model = PromptedCLIP(load_backbone(args.model, pretrained, "cpu"))
    model.add_task("t", PromptConfig(depth=args.depth, n_prefix=8, placement="output"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-ins for learned prompts: non-zero, so the prompted pass is the real work
        for p in model.prompt_parameters("t"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    size = plain.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0))
    block = model.first_prompted_block()

    def shared_bottom():
        _, kept = model.encode_image_keeping(images, block, normalize=True)
        return model.encode_image_from(kept, block, "t", 1.0, normalize=True)

    def pooled():
        _, kept, _ = model.encode_image_pooled(images, block, normalize=True)
        return model.encode_image_from(kept, block, "t", 1.0, normalize=True, pooled=True)

    variants = {"zero_shot": lambda: plain.encode_image(images, normalize=True), "shared_bottom": shared_bottom, "pooled": pooled}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        difference = float((pooled() - shared_bottom()).abs().max())  # also the warm-up
        for k in range(args.calls):
            names = list(variants)
            for name in names[k % 3:] + names[: k % 3]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"model": args.model, "batch": args.batch, "threads": args.threads, "depth": args.depth,
            "image_blocks": len(model.backbone.image_blocks), "calls": args.calls, "machine": machine(),
            "median_ms": {k: round(1e3 * v, 2) for k, v in medians.items()},
            "over_zero_shot": {k: round(medians["zero_shot"] / v, 3) for k, v in medians.items()},
            "max_abs_difference_pooled": difference}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.engine_passes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(PROXY / "proxy-clip.json"), help="open_clip name or model-config JSON [the proxy]")
    p.add_argument("--pretrained", default=str(PROXY / "proxy-clip.safetensors"), help="checkpoint, tag or none [the proxy's]")
    p.add_argument("--depth", type=int, default=3, help="prompted blocks at the end of each tower [3]")
    p.add_argument("--batch", type=int, default=16, help="images per call [16]")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads [1]")
    p.add_argument("--calls", type=int, default=20, help="timed calls per variant (median reported) [20]")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
