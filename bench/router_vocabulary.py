"""The open vocabulary the benchmarks' routers check tasks against, as `keepclip serve --vocabulary` gives it.

    name, names = vocabulary_names("auto", data_root, model)   # the proxy's pretraining names, else imagenet-1k
    vocabulary = open_vocabulary(spec, names)                  # backbone.gate.Vocabulary, built like the engine's

A real CLIP has read ImageNet's class names (the service's default vocabulary); the proxy has read only the captions
of its pretraining pool (../shared/models/proxy-clip/MODEL.md, "Pretraining pool"), so for the proxy the honest
generic vocabulary is those names: words it never read embed as noise and explain nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

PRETRAINING = "pretraining"
AUTO = "auto"
# the proxy's pretraining pool: the first classes of each shared domain
PROXY_POOL = {"cifar10": 10, "caltech101": 100, "eurosat": 5, "gtsrb": 20, "mnist": 5, "fashion_mnist": 5}
HELP = (f"the open vocabulary the router checks tasks against: '{AUTO}' (the proxy's pretraining class names for the "
        f"proxy, else imagenet-1k), '{PRETRAINING}', or a `keepclip serve --vocabulary` value (imagenet-1k, a file of "
        "names, none: the distance gate alone) [%(default)s]")


def vocabulary_names(spec: str, data_root: Path, model: str = "") -> tuple[str, list[str]]:
    """(name, class names) of a --vocabulary value."""
    if spec == AUTO:
        spec = PRETRAINING if Path(model).name == "proxy-clip.json" else "imagenet-1k"
    if spec != PRETRAINING:
        from service.vocabulary import load_vocabulary

        return load_vocabulary(spec)
    names = [n for domain, count in PROXY_POOL.items()
             for n in json.loads((Path(data_root) / domain / "classnames.json").read_text(encoding="utf-8"))[:count]]
    return PRETRAINING, list(dict.fromkeys(names))


def open_vocabulary(spec, names: list[str]):
    """The router's Vocabulary exactly as the engine builds it: frozen text over the default template, model scale."""
    from backbone import DEFAULT_TEMPLATES
    from backbone.gate import Vocabulary
    from service.runtime import TorchRuntime

    if not names:
        return None
    runtime = TorchRuntime(spec.load())
    return Vocabulary(tuple(names), runtime.class_text(names, DEFAULT_TEMPLATES), float(runtime.logit_scale()))
