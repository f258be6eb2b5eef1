"""The decision files of a run folder, as TSV for R, shell and BIDS tools, and the people's ratings.

* ``DIR/decisions.tsv``: one row per pair: ``pair_id subject_id session risk_score expected_error_mm
  expected_error_upper_mm calibration_in_range transform_deviation_mean_mm transform_deviation_p95_mm flag_reasons
  rating exclude``
  (the deviations: empty unless the pair's registration was given as a transform file; ``flag_reasons``
  comma-separated from :data:`equiqc.pipeline.decision.REASONS`, empty when none; ``rating`` empty when nobody
  rated the pair; ``exclude`` ``true``/``false``).
* ``DIR/exclude.tsv``: the pairs to drop (``pair_id subject_id session flag_reasons rating``).
* ``DIR/ratings.tsv``: every rating merged so far (``pair_id rating rater note``), one row per pair, the
  latest file given winning. It is only ever added to by ``equiqc report --ratings``: rebuilding the
  report, resuming a run, or re-thresholding never loses a rating.

A person decides last: ``exclude`` is true when the pair is rated ``exclude``, or when it is flagged and not
rated ``include`` (``unsure`` leaves the flag in charge).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pandas as pd

from equiqc.errors import UserError
from equiqc.pipeline.decision import DEVIATION_KEYS, REASONS
from equiqc.storage.atomic import atomic_path, write_text_atomic

RATINGS = ("include", "exclude", "unsure")
RATING_COLUMNS = ("pair_id", "rating", "rater", "note")
DECISION_COLUMNS = ("pair_id", "subject_id", "session", "risk_score", "expected_error_mm",
                    "expected_error_upper_mm", "calibration_in_range", "transform_deviation_mean_mm",
                    "transform_deviation_p95_mm", "flag_reasons", "rating", "exclude")
EXCLUDE_COLUMNS = ("pair_id", "subject_id", "session", "flag_reasons", "rating")


class RatingsError(UserError, ValueError):
    """A ratings file that cannot be used; the message names the file, row and what to fix."""


def read_ratings(path: str | Path, known_pairs: set[str] | None = None) -> pd.DataFrame:
    """A ratings TSV (columns ``pair_id``, ``rating``, optional ``rater``, ``note``), checked row by row."""
    path = Path(path)
    if not path.is_file():
        raise RatingsError(f"ratings file not found: {path}")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise RatingsError(f"{path}: not a readable TSV file ({exc})") from exc
    missing = [c for c in ("pair_id", "rating") if c not in frame.columns]
    if missing:
        raise RatingsError(f"{path}: missing column {missing[0]!r}; expected tab-separated columns "
                           f"{', '.join(RATING_COLUMNS)}")
    for col in ("rater", "note"):
        if col not in frame:
            frame[col] = ""
    for i, row in enumerate(frame.itertuples(index=False), start=2):
        if row.rating not in RATINGS:
            raise RatingsError(f"{path} row {i}: rating {row.rating!r} for pair {row.pair_id!r}; use one of "
                               f"{', '.join(RATINGS)}")
        if known_pairs is not None and row.pair_id not in known_pairs:
            raise RatingsError(f"{path} row {i}: pair {row.pair_id!r} is not in this run's manifest")
    return frame[list(RATING_COLUMNS)].drop_duplicates("pair_id", keep="last")


def merge_ratings(out_dir: str | Path, new: pd.DataFrame) -> pd.DataFrame:
    """Add ``new`` ratings to ``DIR/ratings.tsv`` (a pair's newer rating replaces its older one); returns all."""
    old = stored_ratings(out_dir)
    merged = pd.concat([old, new], ignore_index=True).drop_duplicates("pair_id", keep="last")
    _write_tsv(merged, Path(out_dir) / "ratings.tsv")
    return merged


def stored_ratings(out_dir: str | Path) -> pd.DataFrame:
    path = Path(out_dir) / "ratings.tsv"
    if not path.is_file():
        return pd.DataFrame(columns=list(RATING_COLUMNS))
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def session_of(*names: str) -> str:
    """The BIDS ``ses-`` label found in any of ``names`` (file names, pair ids), else ``""``."""
    for name in names:
        match = re.search(r"(?:^|[_/])ses-([A-Za-z0-9]+)", str(name))
        if match:
            return match.group(1)
    return ""


def decision_table(rows: list[dict], ratings: pd.DataFrame, sessions: dict[str, str]) -> pd.DataFrame:
    """The decisions.tsv frame from decided report rows, the stored ratings and each pair's session."""
    rating = dict(zip(ratings["pair_id"], ratings["rating"], strict=True))
    records = []
    for r in rows:
        given = rating.get(r["pair_id"], "")
        exclude = given == "exclude" or (bool(r.get("flagged")) and given != "include")
        records.append({"pair_id": r["pair_id"], "subject_id": r["subject_id"],
                        "session": sessions.get(r["pair_id"]) or None,  # written n/a (BIDS)
                        "risk_score": r.get("risk_score"), "expected_error_mm": r.get("expected_error_mm"),
                        "expected_error_upper_mm": r.get("expected_error_upper_mm"),
                        "calibration_in_range": {True: "true", False: "false"}.get(r.get("calibration_in_range")),
                        **{k: r.get(k) for k in DEVIATION_KEYS},
                        "flag_reasons": ",".join(r.get("flag_reasons") or []), "rating": given,
                        "exclude": "true" if exclude else "false"})
    return pd.DataFrame(records, columns=list(DECISION_COLUMNS))


# BIDS-style column descriptions, written beside the TSVs as decisions.json / exclude.json.
COLUMN_DESCRIPTIONS = {
    "pair_id": {"Description": "the pair (for BIDS input: the source image's entities)"},
    "subject_id": {"Description": "the subject (sub-<label> for BIDS input)"},
    "session": {"Description": "the BIDS session label, n/a when none"},
    "risk_score": {"Description": "log2 of the pair's 95th-percentile spread over the cohort median, bounded to "
                                  "[-8, 8] (equiqc.pipeline.decision)", "Units": "1"},
    "expected_error_mm": {"Description": "calibrated expected mean registration error over the evaluation region; "
                                         "n/a without a calibration", "Units": "mm"},
    "expected_error_upper_mm": {"Description": "upper bound of the expected error at the calibration's stated "
                                               "coverage; n/a without a calibration", "Units": "mm"},
    "calibration_in_range": {"Description": "the pair's calibration features lie within the calibration data's "
                                            "range; outside it the bound is widened (docs/calibration.md); n/a "
                                            "without a calibration", "Levels": {"true": "in range",
                                                                               "false": "outside the range"}},
    "transform_deviation_mean_mm": {"Description": "for a pair given its registration as a transform file: mean "
                                                   "distance over the evaluation region between it and the mean of "
                                                   "the perturbed registrations; n/a otherwise", "Units": "mm"},
    "transform_deviation_p95_mm": {"Description": "its 95th percentile (flag reason deviation above the run's "
                                                  "deviation_mm)", "Units": "mm"},
    "flag_reasons": {"Description": "comma-separated reasons the pair is flagged: " + ", ".join(REASONS)},
    "rating": {"Description": "a person's rating from ratings.tsv", "Levels": {r: r for r in RATINGS}},
    "exclude": {"Description": "drop the pair: rated exclude, or flagged and not rated include",
                "Levels": {"true": "drop", "false": "keep"}},
}


def write_decisions(table: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``decisions.tsv`` and ``exclude.tsv`` (atomically) with their JSON column descriptions; returns the
    TSV paths."""
    out_dir = Path(out_dir)
    excluded = table[table["exclude"] == "true"][list(EXCLUDE_COLUMNS)]
    for name, columns in (("decisions", DECISION_COLUMNS), ("exclude", EXCLUDE_COLUMNS)):
        write_text_atomic(out_dir / f"{name}.json",
                          json.dumps({c: COLUMN_DESCRIPTIONS[c] for c in columns}, indent=2) + "\n")
    return _write_tsv(table, out_dir / "decisions.tsv"), _write_tsv(excluded, out_dir / "exclude.tsv")


def _write_tsv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, na_rep="n/a", quoting=csv.QUOTE_MINIMAL)
    return path
