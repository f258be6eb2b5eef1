"""The result store: ``results.zarr/<pair_id>/`` with one array per product, readable by xarray.

Arrays (target grid, RAS+ array order, dims named); which are stored depends on the run's storage level
(``--store``, :mod:`equiqc.storage.levels`):

* ``std_mm`` ``(x, y, z)`` mm; ``n_valid`` ``(x, y, z)`` count (uint16);
* ``error_mm`` ``(x, y, z)`` mm: the calibrated per-voxel error estimate (:mod:`equiqc.pipeline.voxel_error`), at
  every level, when the run's calibration carries a voxel model;
* ``prediction_displacement`` ``(axis, x, y, z)``: the unperturbed prediction minus identity, source voxels,
  float16 (``standard``); :func:`read_array` of ``prediction_map`` rebuilds the map from it;
* ``covariance_mm2`` ``(component, x, y, z)`` mm^2, components ``xx yy zz xy xz yz`` (source world axes);
* ``intrinsic_spread_mm2``, ``bias_jitter_mm2`` (same layout) when the model is stochastic;
* ``mean_map``, ``prediction_map`` ``(axis, x, y, z)`` in source voxel units (RAS+ source grid) (``full``).

Coordinates (:func:`open_pair`, :func:`open_cohort_results`): ``x``, ``y``, ``z`` are the world positions (mm)
of the voxel centres along each axis, from the target affine (the group's ``attrs["affine"]``, the full 4x4;
exact for axis-aligned grids, for oblique grids the positions along the diagonal); ``component`` (``xx yy zz
xy xz yz``) and ``axis`` (``i j k``) label the leading dimensions (kept in the arrays' attributes). They are
derived when a pair is opened, not stored as arrays: every Zarr array costs milliseconds of CPU to create
(:mod:`equiqc.storage.arrays`), and five coordinate arrays per pair were a third of a pair's cost outside the
model at cohort scale. Each array carries CF-style ``units`` (UDUNITS: ``mm``, ``mm2``, ``1`` for counts and voxel
indices) and a ``long_name``.

No consolidated metadata is written: at cohort scale it cost the client about 5 ms per pair at the end of every
run (10 s for 2,000 pairs) and made the root ``zarr.json`` grow with every pair (kilobytes each), which every
consolidated open then parses whole. A pair is opened from its own metadata (:func:`open_pair`); a plain
``xarray.open_zarr(root, group=PAIR, consolidated=False)`` does the same without coordinate values.

A pair is complete only when its marker (group attribute ``equiqc_complete``: model, method, perturbation
config, K, seed, package version, input hash) is written *after* all its arrays. Arrays without a marker are
a half-written pair and are recomputed. A marker whose configuration differs from the run's is refused
unless overwriting is asked for, so results of different configurations are never mixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from equiqc.errors import UserError
from equiqc.storage.arrays import new_group, write_array
from equiqc.storage.levels import DEFAULT_LEVEL, STORE_LEVELS

__all__ = ["open_pair", "open_cohort_results", "read_array", "complete_pairs", "ResultNotFound", "write_result"]

if TYPE_CHECKING:  # writing takes an estimate; reading results (open_pair) must not import torch
    from equiqc.pipeline.estimator import UncertaintyResult

MARKER = "equiqc_complete"
AXES = ("x", "y", "z")
ARRAYS_BESIDE = ("error_mm",)  # computed from the result and a calibration, not held by the result itself
COMPONENT_NAMES = {(0, 0): "xx", (1, 1): "yy", (2, 2): "zz", (0, 1): "xy", (0, 2): "xz", (1, 2): "yz"}
ARRAYS = {  # name -> (leading dim or None, CF/UDUNITS units, long_name)
    "std_mm": (None, "mm", "registration uncertainty: per-voxel spread of the composed predictions"),
    "n_valid": (None, "1", "number of perturbed predictions valid at the voxel"),
    "error_mm": (None, "mm", "calibrated per-voxel estimate of the prediction's error (equiqc.pipeline.voxel_error)"),
    "covariance_mm2": ("component", "mm2", "covariance of the composed predictions (source world axes)"),
    "intrinsic_spread_mm2": ("component", "mm2", "covariance of a stochastic model's draws (source world axes)"),
    "bias_jitter_mm2": ("component", "mm2", "covariance of the per-perturbation mean draws (source world axes)"),
    "mean_map": ("axis", "1", "mean composed map: source voxel index (RAS+ source grid) of each target voxel"),
    "prediction_map": ("axis", "1", "unperturbed prediction: source voxel index (RAS+ source grid) of each "
                       "target voxel"),
    "prediction_displacement": ("axis", "1", "unperturbed prediction minus identity: displacement in source "
                                "voxels (RAS+ source grid), float16"),
}
# Blosc zstd level 1 with byte shuffle. On a 2 mm MNI demo pair (8 chunks per array; /tmp script, 10 writes each):
# std_mm 0.68x its raw float32 size in 5.7 ms of CPU, the float16 displacement 0.69x in 8.4 ms; level 5 stores
# 0.62x and 0.62x but takes 17.5 and 29.6 ms, 3x the CPU of every pair's write for 10 % fewer bytes (zarr's
# default zstd: 0.89x and 1.32x; benchmarks/storage_levels.py).
COMPRESSOR = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
# Labels of the leading dimensions, stored as coordinate arrays so that ``.sel(component="xx")`` works.
MAP_AXES = ("i", "j", "k")  # source voxel axes (RAS+ source grid)
LEADING = {"component": "covariance component (source world axes x y z, RAS+)",
           "axis": "source voxel axis (RAS+ source grid)"}


# Result-key entries that change underneath an unchanged configuration (the model file was replaced, equiqc's
# numerics changed with an upgrade): a stored result that differs only in these is stale and is recomputed,
# never refused and never kept. Any other difference is another configuration (refused unless overwriting).
RECOMPUTE_KEYS = frozenset({"weights_sha256", "numerics_version"})
# The storage level is in the result key too, but it never makes a result of another configuration: a stored
# result complete at a level that keeps at least what the run asks for is used as it is; a lower one is
# recomputed (resume, :func:`status`).
LEVEL_KEY = "store"


def level_covers(stored: str, wanted: str) -> bool:
    """Whether results stored at level ``stored`` hold every array of level ``wanted`` (minimal < standard <
    full)."""
    order = tuple(STORE_LEVELS)
    return order.index(stored) >= order.index(wanted)


def differing_keys(old: dict, new: dict) -> set[str]:
    return {k for k in set(old) | set(new) if old.get(k) != new.get(k)}


class ResultConfigMismatch(RuntimeError):
    """Stored results were computed with another configuration."""


def open_results(root: str | Path) -> zarr.Group:
    return zarr.open_group(str(root), mode="a", zarr_format=3, use_consolidated=False)


def _open(root: str | Path, mode: str = "r") -> zarr.Group:
    """The store as it is on disk (never through consolidated metadata, which stores written by earlier versions
    hold and which only describes the pairs that existed when it was written)."""
    return zarr.open_group(str(root), mode=mode, use_consolidated=False)


def _check_pair_id(pair_id: str) -> None:
    """A pair id names one folder of the store: not empty, no ``/``, not hidden (raises KeyError)."""
    if not pair_id or "/" in pair_id or pair_id.startswith("."):
        raise KeyError(pair_id)


def _pair(root: str | Path, pair_id: str, mode: str = "r") -> zarr.Group:
    """A pair's group, opened by its path (not through the root: one metadata read instead of two)."""
    _check_pair_id(pair_id)
    return zarr.open_group(str(Path(root) / pair_id), mode=mode, zarr_format=3, use_consolidated=False)


def status(root: str | Path, pair_id: str, config: dict | None = None, input_hash: str | None = None) -> str:
    """``complete``, ``missing``, ``incomplete`` (arrays without marker), ``stale`` (computed from other input
    files, other weights or older numerics: recompute) or ``mismatch`` (another configuration: refuse unless
    overwriting)."""
    try:
        group = _pair(root, pair_id)
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return "missing"
    marker = group.attrs.get(MARKER)
    if marker is None:
        return "incomplete"
    if input_hash is not None and marker.get("input_hash") != input_hash:
        return "stale"
    if config is not None and marker.get("config") != config:
        old, new = dict(marker.get("config") or {}), dict(config)
        stored, wanted = old.pop(LEVEL_KEY, "full"), new.pop(LEVEL_KEY, None)  # markers before levels: full
        if old == new:  # only the storage level differs: a result that keeps at least as much is complete
            return "complete" if wanted is None or level_covers(stored, wanted) else "stale"
        return "stale" if differing_keys(old, new) <= RECOMPUTE_KEYS else "mismatch"
    return "complete"


FAILURE = "equiqc_failed"


def write_failure(root: str | Path, pair_id: str, config: dict, input_hash: str | None, error: str,
                  traceback: str | None = None) -> None:
    """Record that estimating ``pair_id`` failed (error and traceback), so a later ``equiqc report`` (of this run
    or of all shards) reports the reason; the next run computes the pair again. Leaves any arrays and any
    completion marker (of another configuration) alone."""
    group = open_results(root).require_group(pair_id)  # a marker of another configuration is left as it is
    group.attrs[FAILURE] = {"config": config, "input_hash": input_hash, "error": error, "traceback": traceback}


def read_failure(root: str | Path, pair_id: str, config: dict, input_hash: str | None) -> dict | None:
    """The failure record of ``pair_id`` for this configuration and these inputs, else None."""
    try:
        record = dict(_pair(root, pair_id).attrs).get(FAILURE)
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if record and record.get("config") == config and record.get("input_hash") == input_hash:
        return record
    return None


def read_marker(root: str | Path, pair_id: str) -> dict | None:
    try:
        return dict(_pair(root, pair_id).attrs).get(MARKER)
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None


def _stored(result: UncertaintyResult, name: str) -> np.ndarray | None:
    """The array ``name`` as stored: ``n_valid`` as uint16 (K x draws < 65536), the prediction's displacement
    as float16 (:mod:`equiqc.storage.levels`), the rest as computed."""
    if name == "prediction_displacement":
        grid = np.indices(result.prediction_map.shape[1:], dtype=np.float32)
        return (result.prediction_map - grid).astype(np.float16)
    data = getattr(result, name)
    if name == "n_valid" and data is not None and data.max(initial=0) < 2**16:
        return data.astype(np.uint16)
    return data


def write_result(root: str | Path, pair_id: str, result: UncertaintyResult, target_affine: np.ndarray,
                 config: dict, input_hash: str | None = None, extra: dict | None = None,
                 overwrite: bool = False, level: str = DEFAULT_LEVEL,
                 arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write a pair's arrays of storage ``level`` (:data:`~equiqc.storage.levels.STORE_LEVELS`), then its
    completion marker ``{"config", "input_hash", "store", **extra}``. ``arrays``: products computed beside the
    result (``error_mm``), written when their level holds them.

    Refuses (``ResultConfigMismatch``) to replace a complete result of another configuration unless
    ``overwrite``. Any previous marker is removed first, so a crash mid-write leaves an incomplete pair.
    """
    if not (Path(root) / "zarr.json").exists():
        open_results(root)
    state = status(root, pair_id, config, input_hash)
    if state == "mismatch" and not overwrite:
        old = read_marker(root, pair_id)["config"]
        raise ResultConfigMismatch(
            f"{root}/{pair_id} holds results of another configuration ({_diff(old, config)}); "
            "use a new output folder or ask for overwriting (--overwrite)")
    _check_pair_id(pair_id)
    # drops old arrays and marker; the grid's attributes with the group, the marker alone after the arrays
    folder = Path(root) / pair_id
    group = new_group(folder, {"affine": np.asarray(target_affine).tolist(), "pair_id": pair_id})
    spatial = result.std_mm.shape
    # One zarr call per array, data and attributes included, by path (storage/arrays.py): the coordinates are not
    # stored as arrays but derived from the affine when the pair is opened (open_pair).
    labels = {"component": [COMPONENT_NAMES[c] for c in result.components], "axis": list(MAP_AXES[: len(spatial)])}
    for name in STORE_LEVELS[level]:
        lead, units, long_name = ARRAYS[name]
        data = (arrays or {}).get(name) if name in ARRAYS_BESIDE else _stored(result, name)
        if data is None:
            continue
        dims = ([lead] if lead else []) + list(AXES[: len(spatial)])
        attrs = {"units": units, "long_name": long_name, **({lead: labels[lead]} if lead else {})}
        # results are rarely equal to the fill value chunk-wide: every chunk written, no comparison
        write_array(folder / name, data, attrs, skip_empty_chunks=False, dimension_names=dims,
                    fill_value=np.nan if data.dtype.kind == "f" else 0, compressors=COMPRESSOR)
    # one attribute write (``attrs.update`` writes the group's metadata once per key: 1.2 ms each)
    group.update_attributes({MARKER: {"config": config, "input_hash": input_hash, "store": level, **(extra or {})}})


def _axis_coords(affine: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    return [affine[d, d] * np.arange(n) + affine[d, -1] for d, n in enumerate(shape)]


def _diff(old: dict, new: dict) -> str:
    keys = sorted(differing_keys(old, new))
    return ", ".join(f"{k}: stored {old.get(k)!r} vs now {new.get(k)!r}" for k in keys[:3]) or "unknown"


def with_coordinates(ds, affine):
    """``ds`` (one pair's arrays as stored) with its coordinates: ``x y z`` the world positions (mm) of the voxel
    centres from ``affine`` (the group's ``attrs["affine"]``), and ``component`` / ``axis`` labels from the
    arrays' attributes. Stores written before coordinates were derived (they held them as arrays) get the same
    values."""
    affine = np.asarray(affine, dtype=float)
    spatial = [d for d in AXES if d in ds.dims]
    values = _axis_coords(affine, tuple(ds.sizes[d] for d in spatial))
    coords = {d: (d, v, {"units": "mm", "long_name": f"world {d} of voxel centres (RAS+)"})
              for d, v in zip(spatial, values, strict=True)}
    for lead, long_name in LEADING.items():
        if lead in ds.dims and lead not in ds.coords:
            names = next((ds[v].attrs[lead] for v in ds.data_vars if lead in ds[v].attrs), None)
            if names is not None:
                coords[lead] = (lead, np.asarray(names), {"long_name": long_name})
    return ds.assign_coords(coords)


def open_pair(root: str | Path, pair_id: str):
    """One pair's results as an ``xarray.Dataset`` (lazy, dask-backed; dims ``x y z`` with world-mm coordinates,
    plus ``component`` (``xx yy zz xy xz yz``) and ``axis`` (``i j k``) coordinates for the covariance and the
    maps): ``open_pair(root, pid).covariance_mm2.sel(component="xy")``. (A plain ``xarray.open_zarr(root,
    group=pid)`` opens the same arrays with named dimensions but no coordinate values.)"""
    import xarray as xr

    _, attrs = read_array(root, pair_id, "std_mm")  # a clear ResultNotFound for a wrong pair id or store
    ds = xr.open_zarr(str(root), group=pair_id, consolidated=False)
    return with_coordinates(ds, attrs["affine"])


def open_cohort_results(root: str | Path):
    """Every pair's results as one ``xarray.DataTree`` (lazy): ``tree[PAIR_ID]`` is :func:`open_pair`'s Dataset,
    the node's attributes hold its affine and completion marker. Lists the store and reads every pair's metadata
    (a few milliseconds per pair); the arrays themselves are read lazily."""
    import xarray as xr

    try:
        _open(root)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise ResultNotFound(f"no result store at {root}; run `equiqc run` first") from None
    tree = xr.open_datatree(str(root), engine="zarr", consolidated=False, chunks={})
    return tree.map_over_datasets(lambda ds: with_coordinates(ds, ds.attrs["affine"]) if "affine" in ds.attrs
                                  else ds)


def complete_pairs(root: str | Path) -> list[str]:
    """The pairs of the store with a completion marker (of any configuration), sorted."""
    try:
        root_group = _open(root)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise ResultNotFound(f"no result store at {root}; run `equiqc run` first") from None
    return sorted(name for name, group in root_group.groups() if MARKER in group.attrs)


class ResultNotFound(UserError, LookupError):
    """A pair or array asked for by name is not in the result store; the message lists what is."""


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def read_array(root: str | Path, pair_id: str, name: str) -> tuple[np.ndarray, dict]:
    """One result array and its attributes, plus the group's ``affine`` under ``attrs['affine']``.

    Raises :class:`ResultNotFound` naming the pairs (or arrays) that do exist when ``pair_id`` (or ``name``)
    is not there."""
    try:
        group = _pair(root, pair_id)  # by its path: listing the store's pairs costs O(pairs)
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        try:
            root_group = _open(root)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise ResultNotFound(f"no result store at {root}; run `equiqc run` first") from None
        pairs = [k for k, _ in root_group.groups()]
        raise ResultNotFound(f"pair {pair_id!r} has no results in {root}; pairs with results: {_listing(pairs)}"
                             ) from None
    def member(array: str):
        """The array opened by name (listing the group's members costs 4 ms more per read)."""
        if array in (*AXES, "component", "axis"):  # coordinates stored as arrays by older versions
            return None
        try:
            found = group[array]
        except KeyError:
            return None
        return found if isinstance(found, zarr.Array) else None

    arr = member(name)
    if arr is None and name == "prediction_map":
        stored = member("prediction_displacement")  # the standard level: the map is identity + displacement
        if stored is not None:
            displacement = stored[...].astype(np.float32)
            return displacement + np.indices(displacement.shape[1:], dtype=np.float32), {
                **dict(stored.attrs), "affine": group.attrs["affine"]}
    if arr is None:
        arrays = [k for k, _ in group.arrays() if k not in (*AXES, "component", "axis")]
        level = (group.attrs.get(MARKER) or {}).get("store")
        hint = f" (stored at level {level!r}; --store full keeps every array)" if level else ""
        if name in ARRAYS_BESIDE:
            hint = " (error_mm is stored when the run's calibration has a voxel model, as `equiqc calibrate` makes)"
        raise ResultNotFound(f"pair {pair_id!r} has no array {name!r}; stored arrays: {_listing(arrays)}{hint}")
    return arr[...], {**dict(arr.attrs), "affine": group.attrs["affine"]}


def invalidate(root: str | Path, pair_id: str) -> None:
    """Remove a pair's completion marker (its inputs changed); the arrays are recomputed on the next run."""
    try:
        group = _pair(root, pair_id, "r+")
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return
    if MARKER in group.attrs:
        del group.attrs[MARKER]
