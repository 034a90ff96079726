"""How well each task's calibrated gate separates its own images from other domains' (proxy CLIP, ../shared/data).

For every pair of domains (A, B): the gate of A is fitted on A's training features only; the table shows the
share of A's test images with w > 0.9 (diagonal) and the share of B's test images with w < 0.1 (off-diagonal).

    python -m bench.gate_separation [--shared ../shared] [--train-limit 2000]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from backbone import PromptedCLIP, fit_task_stats, image_features, load_backbone

DOMAINS = ("mnist", "fashion_mnist", "cifar10", "eurosat", "gtsrb", "caltech101")


def features(model: PromptedCLIP, path: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(path)
    images, labels = data["images"], data["labels"]
    if limit is not None and limit < len(labels):
        keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:limit])
        images, labels = images[keep], labels[keep]
    return image_features(model, images), torch.as_tensor(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="folder with models/ and data/")
    parser.add_argument("--train-limit", type=int, default=None, help="fit each gate on at most this many images")
    args = parser.parse_args(argv)

    proxy = args.shared / "models" / "proxy-clip"
    model = PromptedCLIP(load_backbone(str(proxy / "proxy-clip.json"), str(proxy / "proxy-clip.safetensors"), "cpu"))
    stats, test = {}, {}
    for name in DOMAINS:
        start = time.perf_counter()
        train_features, train_labels = features(model, args.shared / "data" / name / "train.npz", args.train_limit)
        stats[name] = fit_task_stats(train_features, train_labels)
        test[name] = features(model, args.shared / "data" / name / "test.npz", None)[0]
        print(f"{name}: {len(train_labels)} training images, {time.perf_counter() - start:.1f} s", flush=True)

    print("\n| gate of \\ test images of | " + " | ".join(DOMAINS) + " |")
    print("|---" * (len(DOMAINS) + 1) + "|")
    for own in DOMAINS:
        cells = []
        for other in DOMAINS:
            w = stats[own].weight(test[other])
            share = (w > 0.9) if other == own else (w < 0.1)
            cells.append(f"{100 * share.float().mean().item():.1f}" + (" (own)" if other == own else ""))
        print(f"| {own} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
