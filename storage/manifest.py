"""The cohort manifest: one row per image pair.

A CSV (``.csv``) or TSV (``.tsv``/``.txt``) file with a header row. Columns:

* required: ``subject_id``, ``source``, ``target`` (NIfTI paths);
* optional: ``pair_id``, ``source_mask``, ``target_mask``, ``source_labels``, ``target_labels``,
  ``ground_truth`` (a NIfTI of the true map ``phi_AB`` on the target grid, 3 components last: for each
  target-file voxel, the source file's own voxel index it maps to; ingest brings both to the RAS+ arrays.
  Used by synthetic validation and the demo), ``transform`` (a registration already made, as an ITK/ANTs
  transform file from the source to the target: it becomes the pair's stored prediction, checked against the
  perturbed registrations; :mod:`equiqc.storage.transform_files`).

Relative paths resolve against the manifest's folder. A missing ``pair_id`` is derived from the subject
and file names (stable across runs and machines). Problems with the manifest itself stop everything with
one :class:`ManifestError` naming the file, row (line number in the file) and column.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from equiqc.errors import UserError
from equiqc.storage.atomic import atomic_path

REQUIRED = ("subject_id", "source", "target")
OPTIONAL = ("pair_id", "source_mask", "target_mask", "source_labels", "target_labels", "ground_truth", "transform")
PATH_COLUMNS = ("source", "target", "source_mask", "target_mask", "source_labels", "target_labels", "ground_truth",
                "transform")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ManifestError(UserError, ValueError):
    """The manifest cannot be used; the message names the file, row and column and what to do."""


@dataclass(frozen=True)
class PairSpec:
    """One manifest row, paths resolved. ``row`` is the line number in the manifest file."""

    pair_id: str
    subject_id: str
    source: Path
    target: Path
    row: int
    optional: dict[str, Path] = field(default_factory=dict)

    def path(self, role: str) -> Path | None:
        """Path of ``source``, ``target`` or an optional role (``source_mask``...), or None."""
        return {"source": self.source, "target": self.target}.get(role) or self.optional.get(role)

    @property
    def roles(self) -> dict[str, Path]:
        return {"source": self.source, "target": self.target, **self.optional}


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".gz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def derive_pair_id(subject_id: str, source: str, target: str) -> str:
    """``<subject>_<source stem>_to_<target stem>``, with characters outside ``[A-Za-z0-9._-]`` as ``-``."""
    raw = f"{subject_id}_{_stem(source)}_to_{_stem(target)}"
    return _SAFE.sub("-", raw).strip("-.") or "pair"


def read_manifest(path: str | Path) -> list[PairSpec]:
    """Parse and validate a manifest; raises :class:`ManifestError` on the first problem found."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ManifestError(f"{where}: manifest not found (give a CSV or TSV file with columns {', '.join(REQUIRED)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where}: cannot read the manifest as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ManifestError(f"{where}: the manifest is empty; it needs a header row and one row per pair")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    if len(header) == 1 and any(sep in header[0] for sep in ",;\t|" if sep != delimiter):
        kind = "TSV (tab)" if delimiter == "\t" else "CSV (comma)"
        raise ManifestError(f"{where}, row 1: the header {header[0]!r} is not {kind}-separated; "
                            f"save the file with {kind} delimiters or rename it to match (.csv or .tsv)")
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
    if unknown:
        raise ManifestError(f"{where}, row 1, column {unknown[0]!r}: unknown column; allowed columns are "
                            f"{', '.join(REQUIRED + OPTIONAL)}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(f"{where}, row 1: missing required column {missing[0]!r} (header: {', '.join(header)})")
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise ManifestError(f"{where}, row 1, column {sorted(dupes)[0]!r}: column appears twice")

    pairs: list[PairSpec] = []
    seen: dict[str, int] = {}
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise ManifestError(f"{where}, row {line}: {len(values)} fields but the header has {len(header)}")
        row = {h: v.strip() for h, v in zip(header, values, strict=True)}
        for col in REQUIRED:
            if not row[col]:
                raise ManifestError(f"{where}, row {line}, column {col!r}: empty value")
        pair_id = row.get("pair_id") or derive_pair_id(row["subject_id"], row["source"], row["target"])
        if _SAFE.search(pair_id) or pair_id in (".", ".."):
            raise ManifestError(f"{where}, row {line}, column 'pair_id': {pair_id!r} may only use letters, digits, "
                                "'.', '_' and '-'")
        if pair_id in seen:
            raise ManifestError(f"{where}, row {line}, column 'pair_id': duplicate pair id {pair_id!r} "
                                f"(first on row {seen[pair_id]}); give each pair a unique pair_id")
        seen[pair_id] = line
        resolved = {c: (path.parent / row[c]).resolve() for c in PATH_COLUMNS if row.get(c)}
        optional = {c: p for c, p in resolved.items() if c not in ("source", "target")}
        pairs.append(PairSpec(pair_id, row["subject_id"], resolved["source"], resolved["target"], line, optional))
    if not pairs:
        raise ManifestError(f"{where}: the manifest has a header but no pairs")
    return pairs


def write_manifest(path: str | Path, rows: list[dict[str, str]]) -> None:
    """Write rows (dicts of column -> value) as a manifest, atomically; columns in canonical order."""
    columns = [c for c in REQUIRED + OPTIONAL if any(c in r for r in rows)]
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:  # BIDS participant jobs write it side by side
        writer = csv.DictWriter(fh, columns, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
