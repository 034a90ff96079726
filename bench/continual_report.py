"""The continual benchmark's numbers: Transfer, Avg and Last from an accuracy matrix (DESIGN §6), a Markdown
table and a heatmap.

A[j][i] is the accuracy on task i after learning tasks 1..j+1 (rows: after each task; columns: tasks in order).
- Transfer: mean over tasks i > 1 of the mean of A[j][i] for j < i (the tasks not learned yet);
- Avg: mean over all A[j][i] per task, then over tasks;
- Last: mean of the last row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MODE_TITLES = {
    "oracle": "task id given",
    "per-sample": "per-sample routing (batch 1)",
    "batch-vote": "batch vote",
    "class-set": "task's classes given (no routing)",
    "task-agnostic": "task-agnostic (union of classes)",
}


def continual_metrics(matrix: list[list[float]]) -> dict[str, float]:
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square (tasks x tasks), got shape {a.shape}")
    t = a.shape[0]
    transfer = [a[:i, i].mean() for i in range(1, t)]
    return {
        "transfer": float(np.mean(transfer)) if transfer else float("nan"),
        "avg": float(a.mean(axis=0).mean()),
        "last": float(a[-1].mean()),
    }


def retrieval_scores(images: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Text→image retrieval, one query per class over a task's test images (relevant: the images of that class):
    Recall@1, Recall@5 (a relevant image in the top k) and mAP over the whole ranking."""
    scores = queries @ images.T  # (C, N)
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant = labels[order] == np.arange(len(queries))[:, None]  # (C, N) in ranked order
    has = relevant.any(1)
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, relevant.shape[1] + 1)
    ap = np.where(has, (precision * relevant).sum(1) / np.maximum(relevant.sum(1), 1), 0.0)
    return {"recall@1": float(relevant[has, :1].any(1).mean()), "recall@5": float(relevant[has, :5].any(1).mean()),
            "map": float(ap[has].mean())}


def pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def summary_table(report: dict) -> str:
    lines = [
        "| learner | evaluation | Transfer | Avg | Last | train minutes (total) | trainable parameters per task |",
        "|---|---|---|---|---|---|---|",
    ]
    for learner in report["learners"]:
        minutes = sum(x["seconds"] for x in learner["tasks"]) / 60
        params = learner["tasks"][-1]["trainable_parameters"] if learner["tasks"] else 0
        for mode, result in learner["modes"].items():
            m = result["metrics"]
            lines.append(f"| {learner['name']} | {MODE_TITLES.get(mode, mode)} | {pct(m['transfer'])} | {pct(m['avg'])} | "
                         f"{pct(m['last'])} | {minutes:.1f} | {params:,} |")
    return "\n".join(lines)


def retrieval_table(report: dict) -> str:
    lines = ["| learner | " + " | ".join(f"{m} {x}" for m in ("R@1", "R@5", "mAP") for x in ("Transfer", "Avg", "Last")) + " |",
             "|---" * 10 + "|"]
    for learner in report["learners"]:
        if "retrieval" in learner:
            r = learner["retrieval"]
            cells = [pct(r[m]["metrics"][x]) for m in ("recall@1", "recall@5", "map") for x in ("transfer", "avg", "last")]
            lines.append(f"| {learner['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_table(names: list[str], matrix: list[list[float]], zero_shot: list[float] | None) -> str:
    head = "| after \\ on | " + " | ".join(names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    if zero_shot is not None:
        lines.append("| (frozen) | " + " | ".join(pct(x) for x in zero_shot) + " |")
    for j, row in enumerate(matrix):
        lines.append(f"| {j + 1}. {names[j]} | " + " | ".join(pct(x) for x in row) + " |")
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    names = report["tasks"]
    out = [f"### Continual benchmark: {' → '.join(names)} on {report['backbone']['name']}", "", summary_table(report), ""]
    if report.get("keepclip_from"):
        out += [f"keepclip's tasks were not learnt again: they are the ones an earlier run published to {report['keepclip_from']} "
                "(same recipe and data, checksums verified), and its training minutes are that run's.", ""]
    if any("retrieval" in learner for learner in report["learners"]):
        out += ["Text→image retrieval (one query per class over each task's test images; %):", "", retrieval_table(report), ""]
    for learner in report["learners"]:
        minutes = ", ".join(f"{x['task']} {x['seconds'] / 60:.1f}" for x in learner["tasks"])
        out += [f"#### {learner['name']}", "", f"Training minutes per task: {minutes}.", ""]
        for mode, result in learner["modes"].items():
            out += [f"Accuracy (%), {MODE_TITLES.get(mode, mode)}:", "",
                    matrix_table(names, result["matrix"], result.get("before")), ""]
        for metric, result in learner.get("retrieval", {}).items():
            out += [f"Retrieval {metric} (%):", "", matrix_table(names, result["matrix"], result.get("before")), ""]
    return "\n".join(out) + "\n"


def heatmap(report: dict, path: Path) -> Path:
    """One panel per learner x evaluation mode: rows = after learning task j, columns = task i."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(learner["name"], mode, result["matrix"]) for learner in report["learners"] for mode, result in learner["modes"].items()]
    names = report["tasks"]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (learner, mode, matrix) in zip(axes.flat, panels):
        a = 100 * np.asarray(matrix)
        ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        for (j, i), value in np.ndenumerate(a):
            ax.text(i, j, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
        ax.set_title(f"{learner}: {MODE_TITLES.get(mode, mode)}", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=6)
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names], fontsize=6)
    fig.suptitle("accuracy (%) on each task (columns) after learning each task (rows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
