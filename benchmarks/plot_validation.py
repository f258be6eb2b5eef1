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

from equiqc.pipeline.perturbation_config import KINDS  # noqa: E402

BASELINES = {"std": "std_mm", "centre_distance": "distance from centre", "displacement": "displacement magnitude",
             "gradient": "gradient magnitude"}


def markdown_table(table: list[dict]) -> str:
    """The lines as docs/validation.md's table, sorted by model, ground truth and perturbation."""
    head = ("| model | ground truth | perturbation | voxel Pearson median [IQR] | voxel Spearman median [IQR] | "
            "pair Spearman (risk vs error) | AUROC worst third | mean error of prediction (mm) | "
            "mean error of TTA mean map (mm) |\n" + "| --- " * 9 + "|")
    fmt = lambda v: f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"  # noqa: E731
    order = {g: i for i, g in enumerate(("affine", "deformable", "both"))}
    lines = sorted(table, key=lambda r: (r.get("model", "default"), order.get(r["gt"], 9),
                                         KINDS.index(r["perturbation"])))
    rows = [f"| {r.get('model', 'default')} | {r['gt']} | {r['perturbation']} | {fmt(r['voxel_pearson'])} | "
            f"{fmt(r['voxel_spearman'])} | {r['pair_spearman_risk_error']:.2f} | {r.get('auroc_worst_third', 'n/a')} | "
            f"{r['mean_error_mm']:.2f} | {r['tta_error_mm']:.2f} |" for r in lines]
    return "\n".join([head, *rows])


def baseline_table(table: list[dict]) -> str:
    """Per line and region: voxel Spearman / nAURC medians of std_mm and of each baseline map, the best Spearman
    of the row in bold (lines written before the baselines were measured are left out)."""
    head = ("| model | ground truth | perturbation | K | pairs | region | " + " | ".join(BASELINES.values()) + " |\n"
            + "| --- " * (6 + len(BASELINES)) + "|")
    rows = []
    for r in table:
        if "gradient/brain/spearman" not in r.get("voxel", {}):
            continue
        for region in ("brain", "whole"):
            rho = {m: r["voxel"][f"{m}/{region}/spearman"][0] for m in BASELINES}
            best = max(rho, key=rho.get)
            cells = [f"{rho[m]:.2f} / {r['voxel'][f'{m}/{region}/naurc'][0]:.2f}" for m in BASELINES]
            cells = [f"**{c}**" if m == best else c for m, c in zip(BASELINES, cells, strict=True)]
            rows.append(f"| {r.get('model', 'default')} | {r['gt']} | {r['perturbation']} | {r['samples']} | "
                        f"{len(r['pairs_detail'])} | {region} | " + " | ".join(cells) + " |")
    return "\n".join([head, *rows]) if rows else ""


def sweep_table(sweeps: dict) -> str:
    """Per model and K: relative change of std_mm vs K = 64 and its voxel metrics (medians [IQR] over pairs); a
    last row per model with the distance from the centre's metrics on the same pairs."""
    cols = ("brain/spearman", "brain/naurc", "whole/spearman", "whole/naurc")
    head = ("| model | family | pairs | K | change vs K = 64 | Spearman brain | nAURC brain | Spearman whole | "
            "nAURC whole |\n" + "| --- " * 9 + "|")
    fmt = lambda v: f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"  # noqa: E731
    rows = []
    for model, sweep in sweeps.items():
        rows += [f"| {model} | {v['perturbation']} | {v['pairs']} | {k} | {fmt(v['rel_change_vs_64'])} | "
                 + " | ".join(fmt(v["voxel"][c]) for c in cols) + " |" for k, v in sweep.items()]
        last = sweep[max(sweep, key=int)]
        if f"centre_distance/{cols[0]}" in last["voxel"]:
            rows.append(f"| {model} | distance from centre | {last['pairs']} | - | - | "
                        + " | ".join(fmt(last["voxel"][f"centre_distance/{c}"]) for c in cols) + " |")
    return "\n".join([head, *rows]) if rows else ""


def plot_correlations(table: list[dict], out: Path) -> None:
    """correlations.png: voxel and pair Spearman per model, ground truth and perturbation family."""
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


def sweeps_by_model(runs: list[dict]) -> dict:
    """The runs' K sweeps as ``{model: {K: ...}}``. A results.json written before sweeps were per model holds one
    sweep keyed by K, of its first model (the default model when it predates ``--models``)."""
    out = {}
    for run in runs:
        sweep = run.get("k_sweep") or {}
        out.update({run["args"].get("models", ["default"])[0]: sweep} if "4" in sweep else sweep)
    return out


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    table = [line for run in runs for line in run["table"]]
    sweeps = sweeps_by_model(runs)
    out = Path(os.path.commonpath([Path(p).resolve().parent for p in paths]))
    print(markdown_table(table))
    print(baseline_table(table))
    print(sweep_table({model: sweep for model, sweep in sweeps.items() if "voxel" in sweep["4"]}))
    if table:
        plot_correlations(table, out)
    sweep = next(iter(sweeps.values()), None)  # the plot: the first model's sweep
    if sweep:
        ks = sorted(int(k) for k in sweep)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ks, [sweep[str(k)]["rel_change_vs_64"][0] for k in ks], "o-", label="relative change of std_mm vs K=64")
        ax.plot(ks, [sweep[str(k)]["voxel_spearman"][0] for k in ks], "s-", label="voxel Spearman with true error")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"K ({sweep['4'].get('perturbation', 'rigid')} perturbations)")
        ax.legend(fontsize=9)
        fig.savefig(out / "k_sweep.png", bbox_inches="tight", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
