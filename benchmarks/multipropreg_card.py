"""Accuracy and speed of the MultiPropReg backend on atlas-derived pairs with a known map (model card).

Each pair: source = the package's atlas moved by a random smooth + small rigid map (rotations up to 2
degrees, translations up to 3 mm, 2 mm velocity), target = the atlas. Reports mean and 95th-percentile
error (mm, inside the brain) of the prediction and of the identity map, Dice over the 14 labels (warped
source labels, nearest neighbour, vs the atlas labels) before and after registration, and the CPU time
of one forward through the adapter.

    python benchmarks/multipropreg_card.py --pairs 5
    python benchmarks/multipropreg_card.py --pairs 0 --time-batches 1 2 --threads 2   # forward time only
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.scores import map_error_mm
from equiqc.workflows.demo import _subject_map, _templates


def dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    scores = [2 * ((a == v) & (b == v)).sum() / max((a == v).sum() + (b == v).sum(), 1) for v in labels]
    return float(np.mean(scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--time-batches", type=int, nargs="*", default=[], help="time one adapter call at these batches")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t1, affine, brain, seg = _templates("multipropreg")
    labels = [v for v in np.unique(seg) if v != 0]
    model = load_backend("multipropreg")
    gen = torch.Generator().manual_seed(args.seed)
    for batch in args.time_batches:
        x = torch.as_tensor(t1)[None, None].expand(batch, -1, -1, -1, -1).contiguous()
        start = time.perf_counter()
        model.register(x, x, torch.as_tensor(affine), torch.as_tensor(affine))
        seconds = time.perf_counter() - start
        print(json.dumps({"batch": batch, "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
                          "seconds_per_sample": round(seconds / batch, 2)}), flush=True)
    rows = []
    for i in range(args.pairs):
        fwd, inv = _subject_map(t1.shape, affine, gen, rot_deg=2.0, shift_mm=3.0, scale=0.0, vel_mm=2.0)
        src = T.warp(torch.as_tensor(t1)[None, None], fwd.float())[0, 0].numpy()
        src_seg = T.warp(torch.as_tensor(seg.astype(np.int64))[None, None], fwd.float(), mode="nearest")[0, 0]
        start = time.perf_counter()
        phi = model.register(torch.as_tensor(src)[None, None], torch.as_tensor(t1)[None, None],
                             torch.as_tensor(affine), torch.as_tensor(affine))
        seconds = time.perf_counter() - start
        truth = inv[0].numpy()
        err = map_error_mm(phi[0].double().numpy(), truth, affine)[brain]
        ident = map_error_mm(T.identity_grid(t1.shape, torch.float64)[0].numpy(), truth, affine)[brain]
        warped_seg = T.warp(src_seg[None, None], phi, mode="nearest")[0, 0].numpy()
        rows.append({"pair": i, "error_mean_mm": float(err.mean()), "error_p95_mm": float(np.percentile(err, 95)),
                     "identity_mean_mm": float(ident.mean()), "identity_p95_mm": float(np.percentile(ident, 95)),
                     "dice_before": dice(src_seg.numpy(), seg, labels), "dice_after": dice(warped_seg, seg, labels),
                     "forward_s": seconds})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    if not rows:
        return
    summary = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0] if k != "pair"}
    print(json.dumps({"mean_over_pairs": summary, "pairs": args.pairs, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
