"""How much a domain can gain over zero-shot without changing the features: a linear probe on frozen features.

    python -m bench.linear_probe                         # the six shared domains on the proxy
    python -m bench.linear_probe --domains cifar10 mnist

Per domain: frozen zero-shot accuracy (the domain's templates, as in bench.learn_domains) and a multinomial logistic
regression on the frozen, L2-normalised image features of the training images (L-BFGS, L2 penalty chosen on a
seeded 10 % validation split from --penalties, then refit on all training images), both on the test split. A probe
that cannot beat zero-shot says the frozen features carry little more about the domain than the zero-shot head
already uses: a learner must change the features (prompts do) to gain, and with a few thousand images the gain is
small. A diagnostic, not a test: it needs ../shared.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .continual import DEFAULT_SHARED
from .learn_domains import DOMAINS, TEMPLATES


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, penalty: float) -> torch.Tensor:
    """(C, D+1) weights and bias of a softmax regression, L2 penalty on the weights, by L-BFGS."""
    w = torch.zeros(n_classes, x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    optimizer = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(xb @ w.T, y) + penalty * w[:, :-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def probe_accuracy(w: torch.Tensor, x: torch.Tensor, y: np.ndarray) -> float:
    logits = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) @ w.T
    return float((logits.argmax(-1).numpy() == y).mean())


def domain_row(model, folder: Path, penalties: list[float]) -> dict:
    from backbone import image_features, text_classifier
    from training.data import split_train_val

    train, test = np.load(folder / "train.npz"), np.load(folder / "test.npz")
    names = json.loads((folder / "classnames.json").read_text())
    x_train, x_test = image_features(model, train["images"]), image_features(model, test["images"])
    y_train, y_test = train["labels"].astype(np.int64), test["labels"].astype(np.int64)
    zero_shot = float(((x_test @ text_classifier(model, names, TEMPLATES[folder.name]).T).argmax(-1).numpy() == y_test).mean())
    fit_index, val_index = split_train_val(y_train, 0.1, seed=0)
    y = torch.from_numpy(y_train)
    val = {p: probe_accuracy(fit_probe(x_train[fit_index], y[fit_index], len(names), p), x_train[val_index], y_train[val_index])
           for p in penalties}
    chosen = max(penalties, key=lambda p: (val[p], p))  # ties: the stronger penalty
    w = fit_probe(x_train, y, len(names), chosen)
    return {"domain": folder.name, "classes": len(names), "n_train": len(y_train), "n_test": len(y_test),
            "zero_shot_test": zero_shot, "probe_val_by_penalty": {str(p): a for p, a in val.items()}, "penalty": chosen,
            "probe_train": probe_accuracy(w, x_train, y_train), "probe_test": probe_accuracy(w, x_test, y_test)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.linear_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="[%(default)s]")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    p.add_argument("--penalties", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2], help="L2 penalties tried [%(default)s]")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    proxy = args.shared / "models" / "proxy-clip"
    if not (proxy / "proxy-clip.safetensors").is_file():
        print(f"error: needs the proxy model and data in {args.shared} (--shared)", file=sys.stderr)
        return 2
    from backbone import PromptedCLIP
    from training.runtime import load_frozen_backbone

    model = PromptedCLIP(load_frozen_backbone(str(proxy / "proxy-clip.json"), str(proxy / "proxy-clip.safetensors"), "cpu"))
    rows = [domain_row(model, args.shared / "data" / d, args.penalties) for d in args.domains]
    print("| domain | classes | train / test images | frozen zero-shot (%) | linear probe (%) | probe on its training images (%) | L2 penalty (by validation) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['domain']} | {r['classes']} | {r['n_train']} / {r['n_test']} | {100 * r['zero_shot_test']:.1f} | "
              f"{100 * r['probe_test']:.1f} | {100 * r['probe_train']:.1f} | {r['penalty']:g} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
