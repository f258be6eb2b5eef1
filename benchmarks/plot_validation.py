"""Plots for docs/validation.md from benchmarks/validation.py's results.json (one file, or several runs
whose tables are joined; the plots go into their common folder).

    python benchmarks/plot_validation.py docs/validation/results.json
    python benchmarks/plot_validation.py docs/validation/side_by_side/*/results.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def markdown_table(table: list[dict]) -> str:
    """The lines as docs/validation.md's table, sorted by model, ground truth and perturbation."""
    head = ("| model | ground truth | perturbation | voxel Pearson median [IQR] | voxel Spearman median [IQR] | "
            "pair Spearman (risk vs error) | AUROC worst third | mean error of prediction (mm) | "
            "mean error of TTA mean map (mm) |\n" + "| --- " * 9 + "|")
    fmt = lambda v: f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"  # noqa: E731
    order = {g: i for i, g in enumerate(("affine", "deformable", "both"))}
    kinds = {k: i for i, k in enumerate(("translation", "rigid", "affine", "diffeomorphic"))}
    lines = sorted(table, key=lambda r: (r.get("model", "default"), order.get(r["gt"], 9),
                                         kinds.get(r["perturbation"], 9)))
    rows = [f"| {r.get('model', 'default')} | {r['gt']} | {r['perturbation']} | {fmt(r['voxel_pearson'])} | "
            f"{fmt(r['voxel_spearman'])} | {r['pair_spearman_risk_error']:.2f} | {r.get('auroc_worst_third', 'n/a')} | "
            f"{r['mean_error_mm']:.2f} | {r['tta_error_mm']:.2f} |" for r in lines]
    return "\n".join([head, *rows])


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    res = {"table": [line for run in runs for line in run["table"]],
           "k_sweep": next((run["k_sweep"] for run in runs if run.get("k_sweep")), None)}
    out = Path(os.path.commonpath([Path(p).resolve().parent for p in paths]))
    print(markdown_table(res["table"]))
    table = res["table"]
    models = list(dict.fromkeys(r.get("model", "default") for r in table))
    gts = list(dict.fromkeys(r["gt"] for r in table))
    kinds = list(dict.fromkeys(r["perturbation"] for r in table))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False, sharey=True)
    fig.subplots_adjust(hspace=0.45)
    width = 0.8 / len(kinds)
    for row, model in zip(axes, models, strict=True):
        for j, kind in enumerate(kinds):
            for ax, key in zip(row, ("voxel_spearman", "pair_spearman_risk_error"), strict=True):
                vals = [next(r for r in table if r.get("model", "default") == model and r["gt"] == g
                             and r["perturbation"] == kind)[key] for g in gts]
                med = [v[0] if isinstance(v, list) else v for v in vals]
                x = np.arange(len(gts)) + (j - len(kinds) / 2 + 0.5) * width
                if isinstance(vals[0], list):
                    err = np.array([[v[0] - v[1], v[2] - v[0]] for v in vals]).T
                    ax.bar(x, med, width, yerr=err, capsize=2, label=kind)
                else:
                    ax.bar(x, med, width, label=kind)
        for ax, title in zip(row, ("voxel Spearman(std_mm, true error): median, IQR over pairs",
                                   "pair Spearman(risk score, mean true error)"), strict=True):
            ax.set_xticks(range(len(gts)), gts)
            ax.set_xlabel("ground-truth deformation")
            ax.axhline(0, color="k", lw=0.8)
            ax.set_title(f"{model} model\n{title}" if len(models) > 1 else title, fontsize=10)
        row[0].legend(title="perturbation", fontsize=9)
    fig.savefig(out / "correlations.png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    sweep = res.get("k_sweep")
    if sweep and "4" not in sweep:  # one sweep per model (results written before per-model sweeps: K keys)
        sweep = next(iter(sweep.values()))
    if sweep:
        ks = sorted(int(k) for k in sweep)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ks, [sweep[str(k)]["rel_change_vs_64"][0] for k in ks], "o-", label="relative change of std_mm vs K=64")
        ax.plot(ks, [sweep[str(k)]["voxel_spearman"][0] for k in ks], "s-", label="voxel Spearman with true error")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (rigid perturbations)")
        ax.legend(fontsize=9)
        fig.savefig(out / "k_sweep.png", bbox_inches="tight", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
