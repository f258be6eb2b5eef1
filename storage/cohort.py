"""NIfTI -> chunked Zarr ingest of a cohort: ``cohort.zarr/volumes/<content key>`` and ``cohort.zarr/pairs/<pair_id>``.

Input volumes are content-addressed: a file is stored once under ``volumes/<sha256 of its bytes>-<dtype>``,
however many pairs use it (a subject-to-atlas cohort stores the atlas, its mask and labels once, not once
per pair), and each pair group maps its roles to those keys (attribute ``volumes``). Only the ground-truth
map, which depends on both grids of its pair, is stored in the pair group itself. A shared volume is written
under a temporary name and renamed into place, so pairs ingested side by side by several workers never see
half of one (the loser of a race discards its copy). File hashes are cached per process by (path, size,
modification time), so a shared file is hashed once per worker, not once per pair, and the volumes read are
kept per process by content (a few, :data:`LOADED_CACHE_VOLUMES`), so it is also read once per worker. Stores
written before (every volume in its pair group) are still read.

Each volume is reoriented to closest-canonical RAS+ (:mod:`equiqc.storage.nifti`) and stored as a Zarr v3 array
with attributes ``affine`` (RAS+ voxel-to-world, mm), ``original_affine``, ``original_shape``,
``orientation`` (the file's axis codes), ``spacing_mm``, ``source_dtype``, ``sha256`` (of the file's
bytes), ``path`` and ``header`` (the NIfTI header fields outputs on this grid copy:
:func:`equiqc.storage.nifti.header_fields`). Images are stored as float32, masks as uint8, labels as int32,
ground-truth maps and given transforms (manifest column ``transform``, :mod:`equiqc.storage.transform_files`) as
float32 ``(3, X, Y, Z)`` maps in source voxels, in the pair's own group.

Chunks are 64^3 voxels (:func:`equiqc.storage.arrays.chunks_for`); arrays use Zarr's default compression (zstd)
and are written by path, one Zarr call each (:mod:`equiqc.storage.arrays`).

Ingest is idempotent: the pair group records the hashes of its input files, and re-ingesting unchanged
files is skipped. A changed file replaces the whole pair (and its new ``input_hash`` makes any stored
result for the old inputs stale, see :mod:`equiqc.storage.results`). A pair that fails validation is recorded
with ``status="failed"`` and its ``error``; other pairs are unaffected.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from equiqc.pipeline.world import box_coverage, world_box
from equiqc.storage.arrays import new_group, write_array
from equiqc.storage.manifest import PairSpec
from equiqc.storage.nifti import Volume, VolumeError, load_volume
from equiqc.storage.transform_files import read_transform_map

PAIRS = "pairs"  # one group per pair: which volume is each role, status, hashes (and the ground truth)
VOLUMES = "volumes"  # content-addressed input volumes, shared by the pairs that use the same file
ROLE_DTYPES = {"source": np.float32, "target": np.float32, "source_mask": np.uint8, "target_mask": np.uint8,
               "source_labels": np.int32, "target_labels": np.int32}
GRID_OF = {"source_mask": "source", "source_labels": "source", "target_mask": "target",
           "target_labels": "target", "ground_truth": "target", "transform": "target"}
# maps that depend on both grids of their pair: kept in the pair's own group, never shared
PAIR_MAPS = ("ground_truth", "transform")


@dataclass(frozen=True)
class IngestOutcome:
    """What ingest did with one pair: ``status`` is ``ingested``, ``unchanged`` or ``failed``."""

    pair_id: str
    status: str
    error: str | None = None
    input_hash: str | None = None


_HASHES: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256, this process


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes; cached per process while the file's size and modification time stay the same."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def volume_key(sha256: str, dtype) -> str:
    """The name of a content-addressed volume: the file's sha256 and the dtype it is stored as (an image file
    used as a mask is another volume)."""
    return f"{sha256}-{np.dtype(dtype).name}"


def open_cohort(store: str | Path) -> zarr.Group:
    """Open (creating if needed) a cohort store with its ``pairs`` and ``volumes`` groups."""
    root = zarr.open_group(str(store), mode="a", zarr_format=3)
    root.require_group(PAIRS)
    root.require_group(VOLUMES)
    return root


def _check_volume(role: str, path: Path, vol: Volume, max_voxels: int | None) -> None:
    if 0 in vol.data.shape:
        raise VolumeError(f"{role} {path}: a zero-length axis (shape {vol.data.shape})")
    if max_voxels is not None and vol.data.size > max_voxels:
        raise VolumeError(f"{role} {path}: {vol.data.size} voxels exceed the memory guard of {max_voxels}; "
                          "downsample the image or raise the limit (--max-voxels)")
    if not np.isfinite(vol.data).all():
        bad = int((~np.isfinite(vol.data)).sum())
        raise VolumeError(f"{role} {path}: {bad} NaN or infinite voxels; clean the image before QC")
    if role in ("source", "target") and float(vol.data.min()) == float(vol.data.max()):
        raise VolumeError(f"{role} {path}: the image is constant ({float(vol.data.min())}); nothing to register")


def _load_ground_truth(path: Path, target: Volume, source: Volume) -> np.ndarray:
    """The true map target -> source, ``(3, X, Y, Z)`` on the RAS+ target grid, in RAS+ *source* voxels.

    The file holds, on the target file's own grid, the source file's own voxel indices (3 components per
    voxel): both the voxel positions and the stored indices are brought to the RAS+ arrays (for a RAS+
    source the indices are unchanged).
    """
    img = nib.load(str(path))
    if img.shape[:3] != target.original_shape or not np.allclose(img.affine, target.original_affine, atol=1e-3):
        raise VolumeError(f"ground_truth {path}: not on the target's grid (shape {img.shape[:3]} vs "
                          f"{target.original_shape})")
    data = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
    data = data.reshape(*data.shape[:3], -1)
    if data.shape[3] != 3 or not np.isfinite(data).all():
        raise VolumeError(f"ground_truth {path}: expected a finite map with 3 components per voxel")
    to_ras = np.linalg.inv(source.affine) @ source.original_affine  # file source voxel -> RAS+ source voxel
    data = data @ to_ras[:3, :3].T.astype(np.float32) + to_ras[:3, 3].astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(data, 3, 0))


MIN_FOV_OVERLAP = 0.05


def fov_overlap(source: Volume, target: Volume) -> float:
    """Fraction of the target's world bounding box that the source's bounding box covers."""
    return box_coverage(world_box(source.affine, source.data.shape), world_box(target.affine, target.data.shape))


_LOADED: OrderedDict[tuple[str, str], Volume] = OrderedDict()  # (file sha256, dtype) -> Volume, this process
LOADED_CACHE_VOLUMES = 8  # volumes one process keeps for pairs that share files (an atlas, its mask, labels)...
LOADED_CACHE_BYTES = 256 * 2**20  # ...and at most this many bytes of them


def _load(path: Path, dtype, sha256: str | None) -> Volume:
    """:func:`~equiqc.storage.nifti.load_volume`, remembered per process by content: a file many pairs share (an
    atlas, its mask and labels) is read and reoriented once per worker, not once per pair (about 4.5 ms of a 32^3
    pair's ingest, far more for a compressed 1 mm atlas). The least recently used volumes are dropped beyond
    :data:`LOADED_CACHE_VOLUMES` or :data:`LOADED_CACHE_BYTES` (each pair's own files pass through and are dropped
    first); arrays handed out from here are read-only (callers copy what they change)."""
    if sha256 is None:
        return load_volume(path, dtype)
    key = (sha256, np.dtype(dtype).name)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    vol = load_volume(path, dtype)
    vol.data.flags.writeable = False
    _LOADED[key] = vol
    while len(_LOADED) > 1 and (len(_LOADED) > LOADED_CACHE_VOLUMES
                                or sum(v.data.nbytes for v in _LOADED.values()) > LOADED_CACHE_BYTES):
        _LOADED.popitem(last=False)
    return vol


def load_pair(spec: PairSpec, max_voxels: int | None = None,
              hashes: dict[str, str] | None = None) -> dict[str, tuple[np.ndarray, Volume]]:
    """Load and validate every file of a pair; raises :class:`VolumeError` naming the first problem. ``hashes``
    (each role's file sha256, :func:`input_hashes`): files already loaded by this process with the same content
    are not read again."""
    volumes: dict[str, Volume] = {}
    out: dict[str, tuple[np.ndarray, Volume]] = {}
    for role in ("source", "target", "source_mask", "target_mask", "source_labels", "target_labels"):
        path = spec.path(role)
        if path is None:
            continue
        try:
            vol = _load(path, np.float64 if "labels" in role else np.float32, (hashes or {}).get(role))
        except VolumeError as exc:
            raise VolumeError(f"{role} {exc}") from exc
        _check_volume(role, path, vol, max_voxels)
        if role in GRID_OF:
            ref = volumes[GRID_OF[role]]
            if vol.data.shape != ref.data.shape or not np.allclose(vol.affine, ref.affine, atol=1e-3):
                raise VolumeError(f"{role} {path}: not on the {GRID_OF[role]} image's grid (shape {vol.data.shape} "
                                  f"vs {ref.data.shape}); resample it onto the {GRID_OF[role]} grid")
        volumes[role] = vol
        data = vol.data > 0 if role.endswith("mask") else vol.data
        out[role] = (np.asarray(data).astype(ROLE_DTYPES[role]), vol)
    overlap = fov_overlap(volumes["source"], volumes["target"])
    if overlap < MIN_FOV_OVERLAP:
        raise VolumeError(f"source {spec.source} and target {spec.target}: their fields of view overlap in only "
                          f"{100 * overlap:.1f} % of the target's (world coordinates); check that the pair is right "
                          "and that both headers hold the scanner geometry")
    if spec.path("ground_truth") is not None:
        truth = _load_ground_truth(spec.path("ground_truth"), volumes["target"], volumes["source"])
        out["ground_truth"] = (truth, volumes["target"])
    if spec.path("transform") is not None:
        given = read_transform_map(spec.path("transform"), volumes["source"], volumes["target"])
        out["transform"] = (given, volumes["target"])
    return out


def input_hashes(spec: PairSpec) -> tuple[dict[str, str], str]:
    """sha256 of each input file of ``spec`` and the pair's ``input_hash`` over all of them (raises OSError)."""
    hashes = {role: file_sha256(p) for role, p in spec.roles.items()}
    return hashes, hashlib.sha256(repr(sorted(hashes.items())).encode()).hexdigest()


@dataclass
class StoredVolume:
    """A volume read back from the cohort store (RAS+ array order) with its attributes."""

    data: np.ndarray
    affine: np.ndarray
    attrs: dict


def _group(store: str | Path, *path: str, mode: str = "r") -> zarr.Group:
    """A group of the store opened by its path (``PAIRS`` or ``PAIRS, pair_id``): one metadata read, cheaper than
    the root and then its children."""
    return zarr.open_group(str(Path(store).joinpath(*path)), mode=mode, zarr_format=3)


def ingest_pair(spec: PairSpec, store: str | Path, max_voxels: int | None = None) -> IngestOutcome:
    """Ingest one pair into ``store`` (idempotent); never raises for a bad input file. Pairs may be ingested side by
    side once the store exists (:func:`open_cohort`, which a run calls before its workers start)."""
    return ingest_and_keep(spec, store, max_voxels)[0]


def ingest_and_keep(spec: PairSpec, store: str | Path, max_voxels: int | None = None
                    ) -> tuple[IngestOutcome, dict[str, StoredVolume] | None]:
    """:func:`ingest_pair`, also returning the pair's volumes as :func:`read_pair` would read them back (same
    arrays, dtypes and attributes), so a task that ingests and then estimates need not read them again; None when
    nothing was loaded (a pair already ingested, or a failed one)."""
    if not (Path(store) / PAIRS / "zarr.json").exists():
        open_cohort(store)
    folder = Path(store) / PAIRS / spec.pair_id
    try:
        hashes, input_hash = input_hashes(spec)
    except OSError as exc:
        missing = next((f"{r} {p}" for r, p in spec.roles.items() if not p.exists()), str(exc))
        return _record_failure(folder, spec, f"{missing}: file not found or unreadable", None), None
    if (folder / "zarr.json").exists():
        attrs = dict(_group(store, PAIRS, spec.pair_id).attrs)
        if attrs.get("input_hash") == input_hash and attrs.get("status") in ("ok", "failed"):
            return IngestOutcome(spec.pair_id, "unchanged" if attrs["status"] == "ok" else "failed",
                                 attrs.get("error"), input_hash), None
    try:
        loaded = load_pair(spec, max_voxels, hashes)
    except VolumeError as exc:
        return _record_failure(folder, spec, str(exc), input_hash), None
    shared, own, kept = {}, {}, {}
    for role, (data, vol) in loaded.items():
        attrs = {"affine": vol.affine.tolist(), "original_affine": vol.original_affine.tolist(),
                 "original_shape": list(vol.original_shape), "orientation": list(vol.orientation),
                 "spacing_mm": list(vol.spacing_mm), "sha256": hashes[role], "path": str(spec.path(role)),
                 "header": vol.header}
        kept[role] = StoredVolume(data, np.asarray(attrs["affine"]), attrs)
        if role in PAIR_MAPS:  # depends on both grids of this pair: not shared
            own[role] = (data, attrs)
        else:
            shared[role] = volume_key(hashes[role], data.dtype)
            _store_shared(store, shared[role], data, attrs)
    done = {"status": "ok", "error": None, "input_hash": input_hash, "subject_id": spec.subject_id,
            "roles": sorted(loaded), "volumes": shared, "paths": {role: str(spec.path(role)) for role in loaded}}
    # the attributes say "ok" only once everything is written: with the group when it holds no array of its own
    group = new_group(folder, {} if own else done)
    for role, (data, attrs) in own.items():
        write_array(folder / role, data, attrs)
    if own:
        group.update_attributes(done)  # one metadata write (attrs.update writes once per key)
    return IngestOutcome(spec.pair_id, "ingested", None, input_hash), kept


def _store_shared(store: str | Path, key: str, data: np.ndarray, attrs: dict) -> None:
    """Write ``volumes/<key>`` once: into a temporary array, renamed into place (a race's loser discards its copy)."""
    folder = Path(store) / VOLUMES
    if (folder / key / "zarr.json").exists():
        return
    tmp = f".tmp-{uuid.uuid4().hex}"
    write_array(folder / tmp, data, attrs)
    try:
        os.rename(folder / tmp, folder / key)
    except OSError:  # another worker stored the same content first
        shutil.rmtree(folder / tmp, ignore_errors=True)
        if not (folder / key / "zarr.json").exists():
            raise


def _record_failure(folder: Path, spec: PairSpec, error: str, input_hash: str | None) -> IngestOutcome:
    """Replace the pair's group (``folder``) by one that records the failure."""
    new_group(folder, {"status": "failed", "error": error, "input_hash": input_hash, "subject_id": spec.subject_id})
    return IngestOutcome(spec.pair_id, "failed", error, input_hash)


def read_pair(store: str | Path, pair_id: str, roles: tuple[str, ...] | None = None) -> dict[str, StoredVolume]:
    """Read a pair's arrays (all roles, or the given ones that exist) from the cohort store."""
    group = _group(store, PAIRS, pair_id)
    if group.attrs.get("status") != "ok":
        raise VolumeError(f"pair {pair_id}: not ingested ({group.attrs.get('error')})")
    shared = dict(group.attrs.get("volumes", {}))
    out = {}
    for role in roles or group.attrs["roles"]:
        if role in shared:
            arr = zarr.open_array(str(Path(store) / VOLUMES / shared[role]), mode="r")
        elif role in group:  # PAIR_MAPS, and every role of stores written before content addressing
            arr = group[role]
        else:
            continue
        attrs = dict(arr.attrs)
        if role in group.attrs.get("paths", {}):
            attrs["path"] = group.attrs["paths"][role]  # this pair's file (a shared volume keeps the first's)
        out[role] = StoredVolume(arr[...], np.asarray(attrs["affine"]), attrs)
    return out


def pair_status(store: str | Path, pair_id: str) -> dict:
    """The pair group's attributes (``status``, ``error``, ``input_hash``...), or ``{}`` if absent."""
    try:
        return dict(_group(store, PAIRS, pair_id).attrs)
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return {}
