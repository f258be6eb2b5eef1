"""Parameter sets of the ANTs backend that antspyx does not name: fMRIPrep's normalisations, and a user's own file.

A parameter set is a mapping in the key vocabulary of nipype's ``ants.Registration`` (the format fMRIPrep,
sMRIPrep and niworkflows keep their settings in, so a user's existing JSON works as it is), one list entry per
stage: ``transforms``, ``transform_parameters``, ``metric``, ``metric_weight``, ``radius_or_number_of_bins``,
``sampling_strategy``, ``sampling_percentage``, ``number_of_iterations``, ``convergence_threshold``,
``convergence_window_size``, ``shrink_factors``, ``smoothing_sigmas``, ``sigma_units``,
``use_histogram_matching``; and once: ``winsorize_lower_quantile``, ``winsorize_upper_quantile``, ``float``.
Keys of nipype's that only name output files (``output_transform_prefix``, ``write_composite_transform``...) are
accepted and ignored: equiqc writes ANTs' outputs to a temporary folder of its own. Two keys are equiqc's, for the
preprocessing niworkflows' ``RobustMNINormalization`` does around ``antsRegistration``:

* ``truncate_intensity``: ``[lower, upper]`` quantiles both images are truncated to first (ANTs' ``ImageMath
  TruncateImageIntensity``);
* ``initializer``: ``antsAffineInitializer``'s search (``search_factor`` degrees, ``radian_fraction``,
  ``principal_axes``, ``local_search`` iterations) for the initial moving transform; without it, ANTs aligns the
  images' centres of mass.

The two fMRIPrep sets are written here from niworkflows' published values (``t1w-mni_registration_precise_000``,
the first set fMRIPrep/sMRIPrep try, and ``t1w-mni_registration_testing_000``, their ``--sloppy`` set) with the
preprocessing of ``RobustMNINormalization`` (truncation to 0.01-0.999, the affine initializer with nipype's
defaults). What equiqc's replay does not do: the fallback to the ``_001``/``_002`` sets when ``_000`` fails, and
the brain masks fMRIPrep gives its SyN stage (the backend protocol hands a model images, not masks):
docs/models/ants.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from equiqc.errors import UserError

# antsAffineInitializer as nipype runs it by default (niworkflows keeps these): degrees, arc fraction, iterations
INITIALIZER_DEFAULTS = {"search_factor": 15.0, "radian_fraction": 0.1, "principal_axes": False, "local_search": 10}

FMRIPREP: dict = {
    "transforms": ["Rigid", "Affine", "SyN"],
    "transform_parameters": [[0.05], [0.08], [0.1, 3.0, 0.0]],
    "metric": ["Mattes", "Mattes", "CC"],
    "metric_weight": [1, 1, 1],
    "radius_or_number_of_bins": [56, 56, 4],
    "sampling_strategy": ["Regular", "Regular", "None"],
    "sampling_percentage": [0.25, 0.25, 1.0],
    "number_of_iterations": [[100, 100], [100, 100], [100, 70, 50, 20]],
    "convergence_threshold": [1e-6, 1e-6, 1e-6],
    "convergence_window_size": [20, 20, 10],
    "shrink_factors": [[2, 1], [2, 1], [8, 4, 2, 1]],
    "smoothing_sigmas": [[2, 1], [1, 0], [3, 2, 1, 0]],
    "sigma_units": ["vox", "vox", "vox"],
    "use_histogram_matching": [True, True, True],
    "winsorize_lower_quantile": 0.005,
    "winsorize_upper_quantile": 0.995,
    "truncate_intensity": [0.01, 0.999],
    "initializer": INITIALIZER_DEFAULTS,
}

FMRIPREP_SLOPPY: dict = {
    "transforms": ["Rigid", "Affine"],
    "transform_parameters": [[1.0], [1.0]],
    "metric": ["Mattes", "Mattes"],
    "metric_weight": [1, 1],
    "radius_or_number_of_bins": [56, 56],
    "sampling_strategy": ["Random", "Random"],
    "sampling_percentage": [0.2, 0.1],
    "number_of_iterations": [[20], [15]],
    "convergence_threshold": [1e-7, 1e-8],
    "convergence_window_size": [15, 5],
    "shrink_factors": [[2], [1]],
    "smoothing_sigmas": [[4], [2]],
    "sigma_units": ["vox", "vox"],
    "use_histogram_matching": [False, True],
    "winsorize_lower_quantile": 0.005,
    "winsorize_upper_quantile": 0.995,
    "truncate_intensity": [0.01, 0.999],
    "initializer": INITIALIZER_DEFAULTS,
}

PARAMETER_SETS: dict[str, dict] = {"fmriprep": FMRIPREP, "fmriprep-sloppy": FMRIPREP_SLOPPY}

PER_STAGE = ("transforms", "transform_parameters", "metric", "metric_weight", "radius_or_number_of_bins",
             "sampling_strategy", "sampling_percentage", "number_of_iterations", "convergence_threshold",
             "convergence_window_size", "shrink_factors", "smoothing_sigmas", "sigma_units", "use_histogram_matching")
ONCE = ("winsorize_lower_quantile", "winsorize_upper_quantile", "float", "truncate_intensity", "initializer")
IGNORED = ("dimension", "output_transform_prefix", "output_warped_image", "write_composite_transform",
           "collapse_output_transforms", "initialize_transforms_per_stage", "interpolation", "verbose",
           "use_estimate_learning_rate_once", "num_threads")
REQUIRED = ("transforms", "transform_parameters", "metric", "number_of_iterations", "shrink_factors",
            "smoothing_sigmas")


class ParameterError(UserError, ValueError):
    """An ANTs parameter set that cannot be used; the message names the file or key and what to do."""


def read_parameter_file(path: str | Path) -> dict:
    """A parameter set from a JSON or YAML file (nipype ``Registration`` keys, see the module), checked."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"ANTs parameter file {path}: not found")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ParameterError(f"ANTs parameter file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                             f"({exc})") from exc
    return check_parameters(data, str(path))


def check_parameters(data, where: str) -> dict:
    """``data`` if it is a usable parameter set (keys known, required ones present, one entry per stage)."""
    if not isinstance(data, dict):
        raise ParameterError(f"ANTs parameters {where}: expected a mapping of nipype Registration keys")
    unknown = sorted(set(data) - set(PER_STAGE) - set(ONCE) - set(IGNORED))
    if unknown:
        raise ParameterError(f"ANTs parameters {where}: unknown key {unknown[0]!r}; known: "
                             f"{', '.join(PER_STAGE + ONCE)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ParameterError(f"ANTs parameters {where}: missing {missing[0]!r}")
    stages = len(data["transforms"])
    for key in PER_STAGE:
        if key in data and (not isinstance(data[key], list) or len(data[key]) != stages):
            raise ParameterError(f"ANTs parameters {where}: {key!r} needs one entry per stage ({stages}: "
                                 f"{', '.join(map(str, data['transforms']))})")
    return data


def registration_arguments(params: dict, fixed: str, moving: str, prefix: str, initial: str | None,
                           seed: int | None) -> list[str]:
    """``antsRegistration``'s command-line arguments for a parameter set: ``fixed``/``moving`` are the images as
    antspyx pointer strings, ``prefix`` where ANTs writes its transforms, ``initial`` an initial moving transform
    file (else the images' centres of mass are aligned), ``seed`` ANTs' random seed (None: unseeded)."""
    args = ["--dimensionality", "3", "--float", str(int(params.get("float", True))),
            "--output", prefix, "--collapse-output-transforms", "1",
            "--initial-moving-transform", initial or f"[{fixed},{moving},1]"]
    if "winsorize_lower_quantile" in params or "winsorize_upper_quantile" in params:
        args += ["--winsorize-image-intensities", f"[{params.get('winsorize_lower_quantile', 0.0)},"
                 f"{params.get('winsorize_upper_quantile', 1.0)}]"]
    for i, transform in enumerate(params["transforms"]):
        stage = {k: params[k][i] for k in PER_STAGE if k in params}
        radius = stage.get("radius_or_number_of_bins", 32)
        sampling = stage.get("sampling_strategy", "None") or "None"
        metric = (f"{stage['metric']}[{fixed},{moving},{stage.get('metric_weight', 1)},{radius},{sampling},"
                  f"{stage.get('sampling_percentage', 1.0)}]")
        units = stage.get("sigma_units", "vox")
        args += ["--transform", f"{transform}[{','.join(map(str, stage['transform_parameters']))}]",
                 "--metric", metric,
                 "--convergence", f"[{'x'.join(map(str, stage['number_of_iterations']))},"
                 f"{stage.get('convergence_threshold', 1e-6)},{stage.get('convergence_window_size', 10)}]",
                 "--shrink-factors", "x".join(map(str, stage["shrink_factors"])),
                 "--smoothing-sigmas", "x".join(map(str, stage["smoothing_sigmas"])) + units,
                 "--use-histogram-matching", str(int(bool(stage.get("use_histogram_matching", False))))]
    if seed is not None:
        args += ["--random-seed", str(seed)]
    return args + ["--verbose", "1"]
