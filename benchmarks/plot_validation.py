"""Plots for docs/validation.md from benchmarks/validation.py's results.json.

    python benchmarks/plot_validation.py docs/validation/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(path: str) -> None:
    res = json.loads(Path(path).read_text())
    out = Path(path).parent
    table = res["table"]
    gts = list(dict.fromkeys(r["gt"] for r in table))
    kinds = list(dict.fromkeys(r["perturbation"] for r in table))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        for ax, key in zip(axes, ("voxel_spearman", "pair_spearman_risk_error"), strict=True):
            vals = [next(r for r in table if r["gt"] == g and r["perturbation"] == kind)[key] for g in gts]
            med = [v[0] if isinstance(v, list) else v for v in vals]
            x = np.arange(len(gts)) + (j - len(kinds) / 2 + 0.5) * width
            if isinstance(vals[0], list):
                err = np.array([[v[0] - v[1], v[2] - v[0]] for v in vals]).T
                ax.bar(x, med, width, yerr=err, capsize=2, label=kind)
            else:
                ax.bar(x, med, width, label=kind)
    for ax, title in zip(axes, ("voxel Spearman(std_mm, true error): median, IQR over pairs",
                                "pair Spearman(risk score, mean true error)"), strict=True):
        ax.set_xticks(range(len(gts)), gts)
        ax.set_xlabel("ground-truth deformation")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(title="perturbation", fontsize=9)
    fig.savefig(out / "correlations.png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    sweep = res.get("k_sweep")
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
    main(sys.argv[1])
