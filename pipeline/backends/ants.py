"""ANTs (``antspyx``, extra ``equiqc[ants]``) as a backend: a classical registration checked like a network.

Every registration the estimator asks for (the unperturbed one and each perturbed copy) runs the whole ANTs
pipeline in this process: a preset antspyx names (``type_of_transform``: ``SyN``, the default, ``SyNRA``,
``antsRegistrationSyNQuick[s]``, ``Affine``...), or a parameter set (:mod:`equiqc.pipeline.backends.ants_presets`:
``fmriprep``, ``fmriprep-sloppy``, or a user's JSON/YAML file in nipype's ``Registration`` keys). No weights.

Images go to ANTs in memory, built from equiqc's own arrays and voxel-to-RAS affines (RAS+ arrays; ITK's LPS
geometry from :func:`~equiqc.pipeline.world.itk_geometry`), so no qform/sform choice is left to ANTs. ANTs'
forward transforms are composed into one dense displacement field on the target grid (``antsApplyTransforms``
with an output composite field, LPS mm), which becomes the map in source voxels
(:func:`~equiqc.pipeline.world.map_from_displacement_lps`): the pull-back ``antsApplyTransforms -i source -r
target`` applies. Temporary files live in a folder removed after each registration.

Perturbations: a rigid or translation perturbation ``T`` is given to ANTs exactly, as a change of the source's
header (the source array with affine ``A T^-1``, whose columns stay orthogonal), so no perturbed copy is
interpolated; ANTs' answer, read in that header's voxels, is already ``psi = T o phi'``. Other families (affine,
scale, shear, diffeomorphic) resample the source on its grid first, as for any model.

Determinism: ANTs' random sampling is seeded (``seed``, default :data:`DEFAULT_SEED`, passed as ANTs'
``--random-seed`` / ``ANTS_RANDOM_SEED``) and ITK runs ``threads`` threads (default 1; ITK reads its thread count
once per process, before the first registration): then the same inputs give bit-identical results. ``seed=None``
runs unseeded: the backend is stochastic, and ``draws > 1`` measures ANTs' own run-to-run scatter through the
estimator's variance split; its prediction is then the seeded run (:meth:`AntsRegistration.deterministic`).

ANTs holds the GIL for a whole registration and prints to the C++ stdout: run it in worker processes (equiqc's
local cluster does), one registration per worker thread. Its console output is captured at the file
descriptor and kept in :attr:`AntsRegistration.console` (the run writes it to ``DIR/logs/<pair_id>.log``); a
failed registration raises with its last lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from equiqc.errors import require
from equiqc.pipeline import transforms as T
from equiqc.pipeline import world as W
from equiqc.pipeline.backends import ants_presets
from equiqc.pipeline.backends.base import PreparedPair, check_prediction

Tensor = torch.Tensor
DEFAULT_SEED = 1
DEFAULT_PRESET = "SyN"
# antspyx 0.6's ``type_of_transform`` names (its registration refuses others), checked before any pair runs
ANTSPYX_PRESETS = ("SyN", "SyNRA", "SyNOnly", "SyNAggro", "SyNCC", "SyNabp", "SyNLessAggro", "SyNBold", "SyNBoldAff",
                   "ElasticSyN", "Elastic", "TRSAA", "TVMSQ", "TVMSQC", *(f"TV[{i}]" for i in range(1, 9)), "Rigid",
                   "Similarity", "Translation", "Affine", "AffineFast", "BOLDAffine", "QuickRigid", "DenseRigid",
                   "BOLDRigid")
_SYN_SCRIPTS = re.compile(r"antsRegistrationSyN(Quick)?(Repro)?\[(t|r|a|s|sr|so|b|br|bo)\]")
THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


def _import_ants():
    return require("ants", "ants", "model ants (the antspyx package)")


@contextlib.contextmanager
def console_to(path: Path) -> Iterator[None]:
    """Send everything written to this process's stdout file descriptor (C++ ``std::cout`` included) to ``path``
    meanwhile (every thread of the process: ANTs holds the GIL meanwhile anyway)."""
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    with open(path, "wb") as fh:
        os.dup2(fh.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


class AntsRegistration:
    """ANTs as a :class:`~equiqc.pipeline.backends.base.RegistrationBackend` (see the module)."""

    name = "ants"
    input_shape = None

    def __init__(self, preset: str = DEFAULT_PRESET, parameters: str | None = None, seed: int | None = DEFAULT_SEED,
                 threads: int = 1, device: str | torch.device = "cpu"):
        self._ants = _import_ants()
        # a parameter file is this model's "weights": its sha256 keys resume and provenance (base.py)
        self.weights_path = parameters
        if parameters is not None:
            self.parameters: dict | None = ants_presets.read_parameter_file(parameters)
        elif preset in ants_presets.PARAMETER_SETS:
            self.parameters = ants_presets.PARAMETER_SETS[preset]
        elif isinstance(preset, str) and (preset in ANTSPYX_PRESETS or _SYN_SCRIPTS.fullmatch(preset)):
            self.parameters = None  # an antspyx type_of_transform
        else:
            raise ValueError(f"model ants: unknown preset {preset!r}; use fmriprep, fmriprep-sloppy, an antspyx "
                             f"type_of_transform ({', '.join(ANTSPYX_PRESETS[:6])}, ..., antsRegistrationSyNQuick[s]) "
                             "or model option parameters: FILE")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"model ants: seed must be an integer >= 0 or null (unseeded), got {seed!r}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"model ants: threads must be an integer >= 1, got {threads!r}")
        self.preset, self.seed, self.threads = preset, seed, threads
        self.device = torch.device("cpu")  # ANTs has no GPU code: on a GPU worker too, the estimate runs on the CPU
        self.stochastic = seed is None
        self.console: list[str] = []
        self._seed_now = seed
        # ITK reads its default thread count at its first use in the process: set it before any registration
        os.environ[THREADS_VARIABLE] = str(threads)

    # -- the protocol ------------------------------------------------------------------------------------------

    def register(self, source: Tensor, target: Tensor, source_affine: Tensor | None = None,
                 target_affine: Tensor | None = None) -> Tensor:
        d = source.dim() - 2
        if d != 3:
            raise ValueError(f"model ants registers 3D images; got {d}D")
        a_src = T.as_matrix(source_affine, d).cpu().numpy()
        a_tgt = T.as_matrix(target_affine, d).cpu().numpy()
        fixed = target[0, 0].detach().cpu().numpy()
        maps = [self.register_arrays(s[0].detach().cpu().numpy(), a_src, fixed, a_tgt) for s in source]
        out = torch.as_tensor(np.stack(maps), dtype=torch.float32, device=source.device)
        return check_prediction(out, source.shape[0], tuple(target.shape[2:]))

    def prepare(self, source: Tensor, target: Tensor, source_affine: Tensor, target_affine: Tensor) -> PreparedPair:
        self.console = []  # this pair's ANTs output starts here
        return PreparedPair(source, target, source_affine, target_affine)

    def register_perturbed(self, pair: PreparedPair, matrices: Tensor) -> Tensor:
        """``psi_b = T_b o R(A o T_b, B)``; a rigid ``T_b`` is given to ANTs as the header ``A T_b^-1`` (exact),
        any other is resampled on the source grid first."""
        a_src = pair.source_affine.double().cpu().numpy()
        a_tgt = pair.target_affine.double().cpu().numpy()
        source = pair.source[0, 0].cpu().numpy()
        fixed = pair.target[0, 0].cpu().numpy()
        maps = []
        for m in matrices.double().cpu():
            header = a_src @ np.linalg.inv(m.numpy())
            if _orthogonal_columns(header[:3, :3]):
                maps.append(torch.as_tensor(self.register_arrays(source, header, fixed, a_tgt)))
            else:
                moved = T.warp_affine(pair.source, m[None].to(pair.source.device), pair.source.shape[2:])
                phi = torch.as_tensor(self.register_arrays(moved[0, 0].cpu().numpy(), a_src, fixed, a_tgt))
                maps.append(T.apply_affine(m[None], phi[None].double())[0])
        out = torch.stack(maps).to(device=pair.source.device, dtype=torch.float32)
        return check_prediction(out, matrices.shape[0], tuple(pair.target.shape[2:]))

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """An unseeded backend's prediction: the seeded run (:data:`DEFAULT_SEED`)."""
        self._seed_now = DEFAULT_SEED if self.seed is None else self.seed
        try:
            yield
        finally:
            self._seed_now = self.seed

    # -- one registration --------------------------------------------------------------------------------------

    def register_arrays(self, moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray,
                        fixed_affine: np.ndarray) -> np.ndarray:
        """Register the image ``moving`` (array, voxel-to-RAS affine) to ``fixed``: the map ``(3, *fixed.shape)``
        from the fixed grid into ``moving``'s voxel indices (float64)."""
        ants = self._ants
        mov, fix = _image(ants, moving, moving_affine), _image(ants, fixed, fixed_affine)
        with tempfile.TemporaryDirectory(prefix="equiqc-ants-") as tmp:
            log = Path(tmp) / "console.txt"
            try:
                with console_to(log), self._seeded():
                    transforms = self._run(fix, mov, tmp)
                    field_path = ants.apply_transforms(fix, mov, transformlist=transforms,
                                                       compose=str(Path(tmp) / "field_"))
                field = ants.image_read(field_path).numpy()  # (X, Y, Z, 3), LPS mm
            except Exception as exc:
                text = log.read_text(errors="replace") if log.exists() else ""
                self.console.append(text)
                tail = "\n".join(text.strip().splitlines()[-15:])
                raise RuntimeError(f"ANTs registration ({self.describe()}) failed: {exc}"
                                   + (f"\nANTs' last output:\n{tail}" if tail else "")) from exc
            self.console.append(log.read_text(errors="replace"))
        return W.map_from_displacement_lps(np.moveaxis(field.astype(np.float64), -1, 0), moving_affine, fixed_affine)

    def describe(self) -> str:
        """The setting in words (for errors and logs)."""
        return f"preset {self.preset}, seed {self.seed}, {self.threads} ITK thread(s)"

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """ANTS_RANDOM_SEED set to this registration's seed (removed when unseeded), restored after."""
        before = os.environ.get("ANTS_RANDOM_SEED")
        if self._seed_now is None:
            os.environ.pop("ANTS_RANDOM_SEED", None)
        else:
            os.environ["ANTS_RANDOM_SEED"] = str(self._seed_now)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("ANTS_RANDOM_SEED", None)
            else:
                os.environ["ANTS_RANDOM_SEED"] = before

    def _run(self, fixed, moving, tmp: str) -> list[str]:
        """ANTs' forward transforms (files, in antsApplyTransforms order) registering ``moving`` to ``fixed``."""
        ants = self._ants
        prefix = str(Path(tmp) / "reg_")
        if self.parameters is None:
            out = ants.registration(fixed, moving, type_of_transform=self.preset, outprefix=prefix, verbose=True)
            transforms = out["fwdtransforms"]
            return [transforms] if isinstance(transforms, str) else list(transforms)
        from ants.internal import get_pointer_string

        params = self.parameters
        if params.get("truncate_intensity"):
            low, high = params["truncate_intensity"]
            fixed, moving = (ants.iMath_truncate_intensity(im, low, high) for im in (fixed, moving))
        initial = None
        if params.get("initializer"):
            init = {**ants_presets.INITIALIZER_DEFAULTS, **params["initializer"]}
            initial = ants.affine_initializer(fixed, moving, search_factor=init["search_factor"],
                                              radian_fraction=init["radian_fraction"],
                                              use_principal_axis=bool(init["principal_axes"]),
                                              local_search_iterations=init["local_search"],
                                              txfn=str(Path(tmp) / "init.mat"))
        args = ants_presets.registration_arguments(params, get_pointer_string(fixed), get_pointer_string(moving),
                                                   prefix, initial, self._seed_now)
        ants.registration(fixed=args, moving=None)
        written = [Path(prefix + name) for name in ("1Warp.nii.gz", "0GenericAffine.mat")]
        return [str(p) for p in written if p.exists()]


def _orthogonal_columns(linear: np.ndarray, atol: float = 1e-6) -> bool:
    """Whether a voxel-to-world linear part is a rotation (or reflection) times per-axis spacings: what an ITK
    image's geometry can hold."""
    direction = linear / np.linalg.norm(linear, axis=0)
    return bool(np.allclose(direction.T @ direction, np.eye(3), atol=atol))


def _image(ants, array: np.ndarray, affine: np.ndarray):
    """An ANTsImage of a RAS+ array with voxel-to-RAS ``affine`` (antspyx's array axes are numpy's)."""
    origin, spacing, direction = W.itk_geometry(affine)
    return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), origin=list(origin),
                           spacing=list(spacing), direction=np.asarray(direction).reshape(3, 3))


def load_ants(weights: str | None = None, device: str = "cpu", mc_dropout: bool = False,
              **options) -> AntsRegistration:
    """The registry's factory: ``--model ants`` with model options ``preset``, ``parameters`` (a file), ``seed``
    (null: unseeded), ``threads``."""
    if weights is not None:
        raise ValueError("model ants is a classical registration and takes no --weights; choose its setting with "
                         "model options preset / parameters")
    if mc_dropout:
        raise ValueError("model ants has no dropout; for ANTs' own run-to-run scatter use model option seed: null "
                         "with --draws 2 or more")
    known = {"preset", "parameters", "seed", "threads"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"model ants: unknown model option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return AntsRegistration(device=device, **options)
