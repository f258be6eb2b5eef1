"""Train (and evaluate) equiqc's default model on synthetic pairs from the MNI152 2009 template.

Each pair: source = T o a, target = T o b, with T the template (resampled to the network grid, ~2 mm),
a and b random maps ``affine o exp(v)`` (rotations up to 6 degrees, translations up to 5 mm, scalings up
to 5 %, smooth velocity fields of ~2 mm per control point), and intensity augmentation (gamma, smooth bias field, noise)
applied independently to each image. The true map is ``phi_AB = a^-1 o b = exp(-v_a) o M_a^-1 o b``.
Loss: squared error of the predicted map against the true one (network voxels, inside the target's head,
where the map is identifiable) + 0.1 x MSE of the warped source against the target + 0.01 x smoothness
of the velocity.

Reproducible: ``--seed`` fixes the initialisation and the data stream.

    python docs/models/train_default.py --minutes 6 --device cuda --out pipeline/backends/default_weights.pt
    python docs/models/train_default.py --evaluate pipeline/backends/default_weights.pt --pairs 20
    python docs/models/train_default.py --recovery pipeline/backends/default_weights.pt --eval-pairs 20

``--recovery`` is the check a model must pass before it ships (issue 19): on held-out pairs (seed 54321),
the fraction recovered of a smooth local deformation of 3 mm mean displacement in the brain (goal >= 0.7) and of
a rigid offset within the training range (rotations up to 6 degrees per axis, translations up to 5 mm; goal >=
0.9), each ``1 - mean |prediction - truth| / mean |truth - identity|`` (mm, inside the brain mask).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.default_net import NET_SHAPE, DefaultNet
from equiqc.pipeline.backends.module import percentile_normalise as normalise
from equiqc.pipeline.perturbations import rotation_matrices

CONFIG = {"channels": (16, 32, 32, 32, 32), "dropout": 0.1, "steps": 6}


def load_template(path: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template T1 and brain mask on the network grid, and the grid spacing (mm per network voxel)."""
    if path:
        d = np.load(path)
        return d["t1"], d["mask"], d["spacing"]
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=2)
    mask = load_mni152_brain_mask(resolution=2)
    to = lambda a: F.interpolate(torch.as_tensor(np.asarray(a.dataobj, np.float32))[None, None], size=NET_SHAPE,  # noqa: E731
                                 mode="trilinear", align_corners=True)[0, 0].numpy()
    spacing = np.array([2.0 * (n - 1) / (m - 1) for n, m in zip(t1.shape, NET_SHAPE, strict=True)])
    return to(t1), (to(mask) > 0.5).astype(np.float32), spacing


def network_matrices(rot: torch.Tensor, shift_mm: torch.Tensor, spacing: np.ndarray,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """Homogeneous matrices (k,4,4) in network voxels of physical rotations (k,3,3), then scalings (k,3,3) if
    given, about the grid centre, followed by translations (k,3) in mm."""
    grid = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))  # network voxels -> mm
    return T.about_grid_centre(rot if scale is None else rot @ scale, shift_mm, NET_SHAPE, grid)


def random_maps(k: int, gen: torch.Generator, device, spacing: np.ndarray):
    """k maps ``M o exp(v)`` on the network grid: (affine matrices (k,4,4), velocity (k,3,*NET_SHAPE))."""
    deg = (torch.rand(k, 3, generator=gen) * 2 - 1) * 6.0
    rot = rotation_matrices(torch.deg2rad(deg).double(), 3)
    scale = torch.diag_embed(1 + (torch.rand(k, 3, generator=gen).double() * 2 - 1) * 0.05)
    shift_mm = (torch.rand(k, 3, generator=gen).double() * 2 - 1) * 5.0
    mats = network_matrices(rot, shift_mm, spacing, scale).to(device)
    per_voxel = (2.0 / torch.as_tensor(spacing, dtype=torch.float32)).view(1, 3, 1, 1, 1)  # 2 mm in voxels
    coarse = torch.randn(k, 3, 7, 8, 7, generator=gen) * per_voxel
    v = F.interpolate(coarse.to(device), size=NET_SHAPE, mode="trilinear", align_corners=True)
    return mats, v


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = x.shape[0]
    dev = x.device
    gamma = torch.exp((torch.rand(k, generator=gen) * 2 - 1) * 0.3).to(dev).view(k, 1, 1, 1, 1)
    bias = F.interpolate(torch.randn(k, 1, 4, 4, 4, generator=gen).to(dev) * 0.1, size=x.shape[2:],
                         mode="trilinear", align_corners=True)
    x = normalise(x).clamp_min(0) ** gamma * torch.exp(bias)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    dev_gen = torch.Generator(device=dev).manual_seed(noise_seed)  # dense noise drawn on the device
    return x + torch.randn(x.shape, generator=dev_gen, device=dev) * 0.02


def make_batch(t1: torch.Tensor, k: int, gen: torch.Generator, spacing: np.ndarray):
    """(source, target, true phi_AB) on the network grid."""
    dev = t1.device
    ma, va = random_maps(k, gen, dev, spacing)
    mb, vb = random_maps(k, gen, dev, spacing)
    ea = T.displacement_to_map(T.scaling_and_squaring(va))
    eb = T.displacement_to_map(T.scaling_and_squaring(vb))
    a = T.apply_affine(ma, ea)
    b = T.apply_affine(mb, eb)
    src = augment(T.warp(t1, a), gen)
    tgt_clean = T.warp(t1, b)
    head = (tgt_clean > 0.05 * tgt_clean.amax()).float()  # where the true map is identifiable from the images
    tgt = augment(tgt_clean, gen)
    ea_inv = T.displacement_to_map(T.scaling_and_squaring(-va))
    phi = T.sample_map(ea_inv, T.apply_affine(torch.linalg.inv(ma), b))
    return src, tgt, phi, head


def train(args) -> None:
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    t1, mask, spacing = load_template(args.template)
    t1 = torch.as_tensor(t1, device=dev)[None, None]
    gen = torch.Generator().manual_seed(args.seed)
    net = DefaultNet(**CONFIG).to(dev)
    if args.init:
        net.load_state_dict(torch.load(args.init, map_location=dev, weights_only=True)["model"], strict=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    start, it, log = time.time(), 0, []
    deadline = start + args.minutes * 60
    while time.time() < deadline and it < args.max_iterations:
        frac = (time.time() - start) / (args.minutes * 60)
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        src, tgt, phi, head = make_batch(t1.expand(args.batch_size, -1, -1, -1, -1), args.batch_size, gen, spacing)
        v = net.velocity(src, tgt)
        pred = net.integrate(v, src.shape[2:])
        sup = (((pred - phi) ** 2).sum(1, keepdim=True) * head).sum() / head.sum().clamp_min(1)
        sim = F.mse_loss(T.warp(src, pred), tgt)
        smooth = sum((torch.diff(v, dim=d) ** 2).mean() for d in (2, 3, 4))
        loss = sup + 0.1 * sim + 0.01 * smooth
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1
        if it % 50 == 0:
            log.append((it, round(time.time() - start, 1), round(float(sup.detach()), 4)))
            print(json.dumps({"it": it, "s": log[-1][1], "sup_vox2": log[-1][2], "sim": round(float(sim), 5)}),
                  flush=True)
    state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "config": CONFIG,
             "meta": {"iterations": it, "seconds": round(time.time() - start, 1), "seed": args.seed,
                      "batch_size": args.batch_size, "device": str(dev), "lr": args.lr, "init": args.init,
                      "torch": str(torch.__version__),
                      "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(json.dumps({"saved": str(args.out), **state["meta"]}))
    print(json.dumps(evaluate(net.eval(), t1, mask, spacing, pairs=args.eval_pairs, device=dev)))
    print(json.dumps(recovery_check(net.eval(), t1, mask, spacing, pairs=args.eval_pairs, device=dev)))


@torch.no_grad()
def evaluate(net, t1, mask, spacing, pairs: int = 20, device="cpu", seed: int = 12345) -> dict:
    """Held-out synthetic pairs (another seed): error of the prediction and of identity, in mm, in the brain."""
    gen = torch.Generator().manual_seed(seed)
    sp = torch.as_tensor(spacing, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
    brain = torch.as_tensor(mask, device=device) > 0
    errs, idents, folds, times = [], [], [], []
    for _ in range(pairs):
        src, tgt, phi, _ = make_batch(t1[:1], 1, gen, spacing)
        t0 = time.perf_counter()
        pred = net(src, tgt)
        times.append(time.perf_counter() - t0)
        e = ((pred - phi) * sp).norm(dim=1)[0][brain]
        i = ((T.identity_grid(NET_SHAPE, device=device) - phi) * sp).norm(dim=1)[0][brain]
        errs.append(e.cpu())
        idents.append(i.cpu())
        folds.append(float((T.jacobian_determinant(pred)[0][brain] <= 0).float().mean()))
    e, i = torch.cat(errs), torch.cat(idents)
    return {"pairs": pairs, "error_mean_mm": round(float(e.mean()), 3),
            "error_p95_mm": round(float(torch.quantile(e[::10], 0.95)), 3),
            "identity_mean_mm": round(float(i.mean()), 3),
            "identity_p95_mm": round(float(torch.quantile(i[::10], 0.95)), 3),
            "folding_fraction": float(np.mean(folds)), "forward_s_median": round(float(np.median(times)), 3),
            "device": str(device)}


RECOVERY_GOALS = {"local_3mm": 0.7, "rigid_in_range": 0.9}


@torch.no_grad()
def recovery_check(net, t1, mask, spacing, pairs: int = 20, device="cpu", seed: int = 54321) -> dict:
    """Fraction of a known map the model recovers, per kind (see the module doc), on ``pairs`` held-out pairs of
    each kind: source = template moved by the map, target = template (both intensity-augmented), so the true
    map ``phi_AB`` is the map's inverse. Fractions are per pair, summarised by their median and minimum."""
    gen = torch.Generator().manual_seed(seed)
    sp = torch.as_tensor(spacing, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
    brain = torch.as_tensor(mask, device=device) > 0
    ident = T.identity_grid(NET_SHAPE, device=device)
    fwd = lambda w: T.displacement_to_map(T.scaling_and_squaring(w))  # noqa: E731
    out = {}
    for kind, goal in RECOVERY_GOALS.items():
        fractions = []
        for _ in range(pairs):
            if kind == "local_3mm":  # random_maps' velocity only, scaled to 3 mm mean displacement in the brain
                _, v = random_maps(1, gen, device, spacing)
                for _ in range(4):  # exp is not linear in v: a few fixed-point steps bring it to 3 mm
                    v = v * (3.0 / ((fwd(v) - ident) * sp).norm(dim=1)[0][brain].mean())
                a, phi = fwd(v), fwd(-v)
            else:  # rotation and translation drawn in mm about the centre, in network voxels
                deg = (torch.rand(1, 3, generator=gen) * 2 - 1) * 6.0
                shift_mm = (torch.rand(1, 3, generator=gen).double() * 2 - 1) * 5.0
                m = network_matrices(rotation_matrices(torch.deg2rad(deg).double(), 3), shift_mm, spacing).to(device)
                a = T.apply_affine(m, ident)
                phi = T.apply_affine(torch.linalg.inv(m), ident)
            src = augment(T.warp(t1[:1], a.float()), gen)
            tgt = augment(t1[:1], gen)
            pred = net(src, tgt)
            err = ((pred - phi) * sp).norm(dim=1)[0][brain].mean()
            moved = ((phi - ident) * sp).norm(dim=1)[0][brain].mean()
            fractions.append(float(1 - err / moved))
        out[kind] = {"median": round(float(np.median(fractions)), 3), "min": round(float(np.min(fractions)), 3),
                     "goal": goal, "passed": bool(np.median(fractions) >= goal), "pairs": pairs}
    return {"recovery": out, "passed": all(v["passed"] for v in out.values()), "seed": seed, "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--max-iterations", type=int, default=10**9)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--template", help="npz with t1, mask, spacing (default: nilearn's MNI152 at 2 mm)")
    p.add_argument("--export-template", help="write the template npz for a machine without nilearn, and exit")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "pipeline/backends/default_weights.pt"))
    p.add_argument("--eval-pairs", type=int, default=20)
    p.add_argument("--evaluate", help="evaluate these weights instead of training")
    p.add_argument("--recovery", help="run the recovery check on these weights instead of training")
    p.add_argument("--init", help="start from these weights (continued training)")
    args = p.parse_args()
    if args.export_template:
        t1, mask, spacing = load_template(None)
        np.savez_compressed(args.export_template, t1=t1, mask=mask, spacing=spacing)
        return
    if args.evaluate or args.recovery:
        state = torch.load(args.evaluate or args.recovery, weights_only=True)
        net = DefaultNet(**state["config"])
        net.load_state_dict(state["model"], strict=True)
        t1, mask, spacing = load_template(args.template)
        check = evaluate if args.evaluate else recovery_check
        print(json.dumps(check(net.eval().to(args.device), torch.as_tensor(t1, device=args.device)[None, None],
                               mask, spacing, args.eval_pairs, args.device)))
        return
    train(args)


if __name__ == "__main__":
    main()
