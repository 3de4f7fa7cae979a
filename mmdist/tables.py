"""The evaluation's tables: mean ± std over seeds, markdown, CSV, JSON and the accuracy plot."""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import pandas as pd

from mmdist import storage
from mmdist.diagnostics import REFERENCE_PER_CLASS


def aggregate(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (over seeds; numpy's population std) of best and last accuracy per (method, protocol,
    arch, ipc), in the order the groups first appear."""
    std = partial(pd.Series.std, ddof=0)
    groups = pd.DataFrame(trials).groupby(["method", "protocol", "arch", "ipc"], sort=False)
    table = groups.agg(mean=("best_acc", "mean"), std=("best_acc", std), last_mean=("last_acc", "mean"),
                       last_std=("last_acc", std), n=("best_acc", "size"))
    return table.round(2).reset_index().to_dict("records")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table (best test accuracy over training, mean ± std over seeds)."""
    lines = ["| method | protocol | arch | IPC | best acc % | last acc % | n |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ipc = "all" if r["method"] == "full" else r["ipc"]
        lines.append(f"| {r['method']} | {r['protocol']} | {r['arch']} | {ipc} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{r['last_mean']:.2f} ± {r['last_std']:.2f} | {r['n']} |")
    return "\n".join(lines)


def diagnostics_markdown(diagnosed: list[dict[str, Any]], note: str) -> str:
    """The diagnostics table: fidelity (%) and precision / recall / density / coverage."""
    lines = [f"Distilled-set diagnostics ({note}; k-NN manifolds, k = 5, against "
             f"{REFERENCE_PER_CLASS} real train images per class):", "",
             "| method | IPC | fidelity % | precision | recall | density | coverage |", "|---|---|---|---|---|---|---|"]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"  # None: too few images per class for k-NN balls

    for d in diagnosed:
        lines.append(f"| {d['method']} | {d['ipc']} | {d['fidelity']:.2f} | "
                     + " | ".join(cell(d[key]) for key in ("precision", "recall", "density", "coverage")) + " |")
    return "\n".join(lines)


def write_tables(folder: str, rows: list[dict[str, Any]], table: str, diagnosed: list[dict[str, Any]] = ()) -> None:
    """results.md, results.csv, results.json, diagnostics.json and accuracy.png."""
    storage.write_bytes(storage.join(folder, "results.md"), (table + "\n").encode())
    storage.write_json(storage.join(folder, "results.json"), rows)
    if diagnosed:
        storage.write_json(storage.join(folder, "diagnostics.json"), list(diagnosed))
    storage.write_bytes(storage.join(folder, "results.csv"), pd.DataFrame(rows).to_csv(index=False).encode())
    storage.write_bytes(storage.join(folder, "accuracy.png"), plot(rows))


def plot(rows: list[dict[str, Any]]) -> bytes:
    """PNG: accuracy vs IPC, one panel per architecture, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in rows})
    fig, axes = plt.subplots(1, len(archs), figsize=(4.5 * len(archs), 3.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for method in sorted({r["method"] for r in rows if r["arch"] == arch}):
            pts = sorted((r["ipc"], r["mean"], r["std"]) for r in rows if r["arch"] == arch and r["method"] == method)
            if method == "full":
                ax.axhline(pts[0][1], ls="--", color="gray", label="full")
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=method,
                        capsize=3)
        ax.set_title(arch)
        ax.set_xticks(sorted({r["ipc"] for r in rows if r["arch"] == arch and r["method"] != "full"}))  # whole IPCs
        ax.set_xlabel("images per class")
        ax.set_ylabel("test accuracy (%)")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

