"""The fused prompt branch against the wrapper it replaced and the frozen tower, in one run (a benchmark, not a test).

    python -m bench.prompt_branch                        # the proxy, batch 16, 1 torch thread
    python -m bench.prompt_branch --batch 16 --threads 1 --calls 60 --json out.json

Three ways to run the image tower of one backbone (default: the proxy, ../shared/models/proxy-clip), on the same
weights and images, under `torch.no_grad` like the service:

- **frozen**: the tower without prompts (each wrapper calls its frozen module): the baseline;
- **old**: the pre-fusion wrapper (reference copy below): the frozen module, then per task group a second q
  projection, softmax(q P_Kᵀ/√h) P_V, a second output projection, added with `index_add`;
- **fused**: today's `PromptedAttention` (`backbone/prompts.py`): a batch where every sample has prompts is one
  `fused_attention` pass (one in-projection, the frozen attention plus w · the prompt term, one output projection);
  a mixed batch is the frozen module plus `prompt_delta` on the prompted rows (only q projected again).

Measured on one block's attention (the first block's, on its real input) and on the whole image tower, for a batch of
one task and for a mixed batch (tasks a, b and none as a, b, none, a, ...). Tasks have `PromptConfig()`'s shape
(depth 8, capped at the tower; n 8) and random prompts. Each measurement: --calls single calls per variant,
interleaved with the others' in rotating order (so that load changes on a shared machine hit all alike); the median
per call is reported with its ratio to frozen, and fused / old. The largest difference between the old and the
fused features is printed (they compute the same function, to rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KEEPCLIP_SHARED", REPO.parent / "shared"))
PROXY = SHARED / "models" / "proxy-clip"


# ----------------------------------------------------------------------------- the pre-fusion wrapper (reference)


def old_branch(base, x, keys, values):
    """W_o · softmax(q P_Kᵀ/√h) P_V for batch-first x (B, L, D), one task's (n, D) prompts."""
    import torch.nn.functional as F

    width, heads = base.in_proj_weight.shape[1], base.num_heads
    q_bias = base.in_proj_bias[:width] if base.in_proj_bias is not None else None
    q = F.linear(x, base.in_proj_weight[:width], q_bias)
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
    k = keys.unflatten(-1, (heads, -1)).transpose(0, 1)
    v = values.unflatten(-1, (heads, -1)).transpose(0, 1)
    attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return F.linear((attn @ v).transpose(1, 2).flatten(2), base.out_proj.weight)


def old_forward(self, x, *args, **kwargs):
    out = self.base_layer(x, *args, **kwargs)
    groups = [g for g in self.routing.groups(self.tower) if g.slot in self.prefix_keys]
    if not groups:
        return out
    attn_out = out[0] if isinstance(out, tuple) else out
    batch_dim = 0 if self.batch_first else 1
    for g in groups:
        x_g = x.index_select(batch_dim, g.index)
        if not self.batch_first:
            x_g = x_g.transpose(0, 1)
        delta = old_branch(self.base_layer, x_g, self.prefix_keys[g.slot], self.prefix_values[g.slot])
        delta = delta * g.weight.to(delta.dtype).view(-1, 1, 1)
        if not self.batch_first:
            delta = delta.transpose(0, 1)
        attn_out = attn_out.index_add(batch_dim, g.index, delta)
    return (attn_out, *out[1:]) if isinstance(out, tuple) else attn_out


@contextmanager
def old_wrappers():
    from backbone import PromptedAttention

    fused = PromptedAttention.forward
    PromptedAttention.forward = old_forward
    try:
        yield
    finally:
        PromptedAttention.forward = fused


# ----------------------------------------------------------------------------- measuring


def measure(variants: dict, calls: int, sync) -> dict[str, float]:
    """Median seconds per call of each variant: single calls interleaved (A B C, B C A, ...), so that a load change
    on a shared machine hits every variant alike; one warm-up call each, not counted."""
    names = list(variants)
    for name in names:
        variants[name]()
    times = {name: [] for name in names}
    for r in range(calls):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            variants[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args) -> dict:
    import torch

    from backbone import PromptConfig, PromptedCLIP, load_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_backbone(args.model, args.pretrained, args.device)
    device = backbone.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = PromptedCLIP(backbone)
    for i, task in enumerate(("a", "b")):
        model.add_task(task, PromptConfig())
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.prompt_parameters(task):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    size = backbone.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    batches = {"one task": ["a"] * args.batch, "mixed": (["a", "b", None, "a"] * args.batch)[: args.batch]}

    # the first block's attention, called with what the tower passes it
    attn = backbone.image_blocks[0].attn
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        model.encode_image(images)
    hook.remove()
    block_args, block_kwargs = captured["args"], captured["kwargs"]

    rows = []
    with torch.no_grad():
        for label, tasks in batches.items():
            groups = model._groups(tasks, 1.0, args.batch, device)

            def block_prompted():
                with model.routing.use("visual", groups):
                    return attn(*block_args, **block_kwargs)

            def tower_prompted():
                return model.encode_image(images, tasks)

            def in_old(fn):
                def call():
                    with old_wrappers():
                        return fn()
                return call

            for scope, frozen, prompted in (
                ("one block (attention)", lambda: attn.base_layer(*block_args, **block_kwargs), block_prompted),
                ("image tower", lambda: model.encode_image(images), tower_prompted),
            ):
                t = measure({"frozen": frozen, "old": in_old(prompted), "fused": prompted}, args.calls, sync)
                rows.append({"scope": scope, "batch": label, **{k: v * 1e3 for k, v in t.items()}})
            with old_wrappers():
                old = tower_prompted()
            rows[-1]["max_abs_diff_old_fused"] = float((old - tower_prompted()).abs().max())
    return {"rows": rows, "model": args.model, "batch": args.batch, "threads": args.threads, "device": str(device)}


def markdown(result: dict) -> str:
    lines = [
        f"batch {result['batch']}, {result['threads']} torch thread(s), {result['device']}; ms per call (median)",
        "",
        "| scope | batch | frozen ms | old wrapper ms | fused ms | old / frozen | fused / frozen | fused / old |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scope']} | {r['batch']} | {r['frozen']:.3f} | {r['old']:.3f} | {r['fused']:.3f} | "
            f"{r['old'] / r['frozen']:.3f} | {r['fused'] / r['frozen']:.3f} | {r['fused'] / r['old']:.3f} |"
        )
    diffs = ", ".join(f"{r['batch']} {r['max_abs_diff_old_fused']:.1e}"
                      for r in result["rows"] if "max_abs_diff_old_fused" in r)
    lines += ["", f"largest |old - fused| over the tower's features: {diffs}"]
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores available, load average {os.getloadavg()[0]:.1f}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(PROXY / "proxy-clip.json"),
                   help="open_clip name or model-config JSON (default: the proxy)")
    p.add_argument("--pretrained", default=str(PROXY / "proxy-clip.safetensors"),
                   help="checkpoint, tag, or none (random init)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch", type=int, default=16, help="images per call")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--calls", type=int, default=60, help="timed calls per variant and measurement (median reported)")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    if min(args.batch, args.threads, args.calls) < 1:
        p.error("--batch, --threads and --calls must be >= 1")

    result = run(args)
    print("command: python -m bench.prompt_branch " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("machine:", machine())
    print()
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), **result}, indent=2))


if __name__ == "__main__":
    main()
