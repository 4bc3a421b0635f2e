"""The one objective shared by NLSQ and CMC: weighted residuals over the fitted pairs.

MODEL.md, "Fitting conventions": each independent pair ``t_i < t_j`` of each angle is
fitted once, the diagonal never; pairs whose ``c2`` (or ``sigma``) is not finite are
masked. The residual of a pair is ``(model - data) / sigma``, or ``model - data`` when
the Dataset has no ``sigma``.

The fitted quantities are packed in one vector ``z = [physics (14), contrast (n_scale),
offset (n_scale)]`` with ``n_scale = n_phi`` (per-angle scaling) or 1 (shared); a solver
sees only the varied entries ``x``. :class:`Objective` owns that packing, the bounds and
starts, the residuals, the cost and its gradient, the normal equations and the
covariance: ``fit_nlsq`` minimises its cost, ``fit_cmc`` samples the Gaussian likelihood
of its residuals, and a user's own optimiser can take its :meth:`Objective.cost` and
:meth:`Objective.gradient`.
"""

from __future__ import annotations

import warnings
from functools import cached_property, partial
from typing import NamedTuple

import jax
import numpy as np
import xarray as xr

from heterodyne import model, shapes, starts, structured, uncertainty
from heterodyne.data import validate
from heterodyne.errors import OptionError, ParameterError
from heterodyne.pairs import (
    Pairs,
    fitted_pairs,
    pair_counts,
    residuals,
    unpack,
)
from heterodyne.parameters import (
    LOG_DECADES,
    LOG_SCALE,
    PHYSICS_INDEX,
    PHYSICS_NAMES,
    SCALING_NAMES,
    Parameters,
)
from heterodyne.results import (
    assign_entries,
    at_entries,
    entries,
    entry_label,
    identifiability_warnings,
    params_layout,
    stacked,
)

SCALINGS = ("per_angle", "shared")
# Starts of multistart="auto": the best estimate from the data and the next distinct ones.
AUTO_STARTS = 3


# Pairs are processed in blocks of this many, so that the Jacobian is never held for all
# pairs at once: memory O(BLOCK x n_varied) whatever the size of the data.
BLOCK = 2**16
_PER_PAIR = ("angle", "i", "j", "c2", "weight")


def free_residuals(x, template, free, pairs: Pairs, n_scale: int):
    """Weighted residuals at the solver vector ``x``: the varied entries ``free`` of the
    packed vector ``template`` set to ``x`` (differentiable by JAX in ``x``)."""
    return residuals(template.at[free].set(x), pairs, n_scale)


def pair_blocks(pairs: Pairs):
    """The pairs as blocks of one length: ``BLOCK``, or where fewer would do, the size
    class of the pairs that the frames' and angles' size classes hold
    (:mod:`heterodyne.shapes`), the frames and angles padded to their size classes (to be
    evaluated with the packing of :class:`Padding`). Yields ``(count, block)``: the
    block's first ``count`` pairs are real, the rest weight-0 padding (the pair ``(0, 1)``
    of angle 0: finite, never fitted). Data of similar size make blocks of one shape, so
    the compiled code is shared."""
    n_pairs, n_frames = pairs.n_pairs, shapes.size_class(pairs.t.shape[0])
    n_angles = shapes.angle_class(pairs.phi.shape[0])
    # as many as the size classes can hold: any window and angle subset of them fits
    size = min(BLOCK, shapes.size_class(n_angles * n_frames * (n_frames - 1) // 2))
    t, phi = shapes.pad_edge(pairs.t, n_frames), shapes.pad_edge(pairs.phi, n_angles)
    arrays = {k: np.asarray(getattr(pairs, k)) for k in _PER_PAIR}
    for start in range(0, n_pairs, size):
        part = {k: v[start : start + size] for k, v in arrays.items()}
        count = part["c2"].shape[0]
        if count < size:
            part = {k: shapes.pad_zeros(v, size) for k, v in part.items()}
            part["j"][count:] = 1
        yield count, pairs._replace(t=t, phi=phi, **part)


@partial(jax.jit, static_argnums=4)
def _block_residuals(x, template, free, pairs, n_scale):
    return free_residuals(x, template, free, pairs, n_scale)


@partial(jax.jit, static_argnums=4)
def _block_cost_and_gradient(x, template, free, pairs, n_scale):
    def half_sum_of_squares(y):
        r = free_residuals(y, template, free, pairs, n_scale)
        return 0.5 * r @ r

    return jax.value_and_grad(half_sum_of_squares)(x)


@partial(jax.jit, static_argnums=4)
def block_normal_equations(x, template, free, pairs, n_scale):
    """``(J^T J, J^T r, r^T r)`` of one block of pairs, from the Jacobian by ``jacfwd``."""
    r = free_residuals(x, template, free, pairs, n_scale)
    jac = jax.jacfwd(free_residuals)(x, template, free, pairs, n_scale)
    return jac.T @ jac, jac.T @ r, r @ r


def blocked_normal_equations(x, template, free, pairs: Pairs, n_scale: int):
    """``(J^T J, J^T r, r^T r)`` at ``x``, summed over :func:`pair_blocks`, whose angles
    are padded: ``x``, ``template``, ``free`` and ``n_scale`` as packed by
    :func:`pad_angles`."""
    parts = [block_normal_equations(x, template, free, b, n_scale) for _, b in pair_blocks(pairs)]
    return tuple(sum(p[k] for p in parts) for k in range(3))


class Padding(NamedTuple):
    """The packing of the compiled calls, the angles padded to their size class
    (:func:`heterodyne.shapes.angle_class`), so that an angle subset reuses the programs
    of any earlier fit of the same class; made by :func:`pad_angles`.

    A padded angle has no pair (weight 0): its contrast and offset (copies of the last
    angle's) change no residual, and their entries of the gradient and the normal
    equations are zero. The solver never sees them: they follow the solver vector's
    entries in ``free`` and are appended to ``x`` (``tail``) at each call, and the
    outputs are cut back to the solver's entries (:meth:`Objective.normal_equations`).
    """

    template: jax.Array  #: the packed vector ``[physics (14), contrast, offset]``, padded
    free: jax.Array  #: entries of ``x``: the solver's (in its order), then the padded angles'
    n_scale: int  #: contrast/offset pairs of the padded vector (the padded angles, or 1)
    tail: np.ndarray  #: values of the padded angles' entries, appended to ``x``


def pad_angles(template, free, n_scale: int) -> Padding:
    """:class:`Padding` of the packed vector ``template`` with ``n_scale`` contrast/offset
    pairs (one per angle, or 1 shared) and the varied entries ``free``."""
    template, free = np.asarray(template, dtype=np.float64), np.asarray(free)
    n = len(PHYSICS_NAMES)
    size = shapes.angle_class(n_scale) if n_scale > 1 else 1
    physics, contrast, offset = unpack(template, n_scale)
    padded = np.concatenate(
        [physics, shapes.pad_edge(contrast, size), shapes.pad_edge(offset, size)]
    )
    # the offsets move up by the padded contrasts; the padded angles' entries vary where
    # the real angles' do (per-angle scaling varies all contrasts, or none)
    moved = np.where(free >= n + n_scale, free + size - n_scale, free)
    tail = np.concatenate(
        [
            np.arange(first + n_scale, first + size)
            for first in (n, n + size)
            if np.any((moved >= first) & (moved < first + n_scale))
        ]
        + [np.zeros(0, dtype=int)]
    )
    return Padding(
        jax.device_put(padded),
        jax.device_put(np.concatenate([moved, tail]).astype(np.int32)),
        size,
        padded[tail],
    )


def _on_device(x, tail=()):
    """The solver vector, with ``tail`` appended, as a float64 JAX array, without a
    compiled conversion (which ``jnp.asarray`` would run, and compile per shape)."""
    return jax.device_put(np.concatenate([np.asarray(x, dtype=np.float64), tail]))


class Errors(NamedTuple):
    """Outcome of :meth:`Objective.errors_at`."""

    covariance: np.ndarray  #: covariance of the varied quantities, the chosen errors
    nominal: np.ndarray  #: the nominal least-squares covariance
    scales: (
        dict  #: scales of the error model (``speckle_kappa``, ``shot_kappa``, ``white_variance``)
    )
    z: np.ndarray  #: the packed vector at ``x``


class Objective:
    """The least-squares objective of one Dataset and one set of parameters.

    Owns everything both engines read: the fitted pairs, the packing between the
    parameters and the solver vector ``x`` (the varied entries of the packed vector
    ``z``), the bounds and starts, the weighted residuals, the cost ``0.5 |r|²``, its
    gradient, the normal equations and the covariance. :func:`heterodyne.fit_nlsq`
    minimises :meth:`cost`; :func:`heterodyne.fit_cmc` samples the Gaussian likelihood
    of the same residuals. Build one with :meth:`build`. Between the solver vector and
    the parameters: :meth:`values` (``x`` to a ``params`` Dataset, contrast and offset
    along ``phi``) and :meth:`from_values` (back); :meth:`errors` and
    :meth:`covariance_array` give a result's ``stderr`` and ``covariance``.

    Attributes
    ----------
    ds : xarray.Dataset
        The data.
    params : Parameters
        The parameters after starts, bounds and fixes were settled.
    pairs : Pairs
        The fitted pairs (made on first use).
    n_pairs : int
        Their number.
    entries : pandas.MultiIndex
        ``(name, phi)`` of each entry of ``x``: ``phi`` [deg] for one angle's contrast or
        offset with per-angle scaling, NaN for a physics parameter or a shared one.
    lower, upper : numpy.ndarray
        Bounds of ``x``.
    x0 : numpy.ndarray
        The start.
    n_scale : int
        Number of contrast/offset pairs (``n_phi`` or 1).

    Examples
    --------
    >>> from scipy.optimize import minimize
    >>> ds = hd.simulate({"v0": 500.0}, phi=[0, 90], n_frames=40, noise=0.01)
    >>> objective = hd.Objective.build(ds)
    >>> found = minimize(objective.cost, objective.x0, jac=objective.gradient,
    ...                  bounds=list(zip(objective.lower, objective.upper)))
    """

    def __init__(self, ds, params, n_pairs, template, free, index, lower, upper, n_scale, scaling):
        self.ds, self.params, self.n_pairs = ds, params, n_pairs
        self.template, self.free, self.entries = template, free, index
        self.lower, self.upper, self.n_scale, self.scaling = lower, upper, n_scale, scaling
        self.x0 = np.asarray(template)[np.asarray(free)]
        self.n_physics = int(np.sum(np.asarray(free) < len(PHYSICS_NAMES)))  #: varied physics
        self.alternatives = []  #: further starts read off the data (multistart="auto")

    @classmethod
    def build(cls, ds, params=None, *, fix=(), scaling="per_angle", multistart=0) -> Objective:
        """The objective of ``ds`` and ``params``, checked before any compile.

        Parameters
        ----------
        ds : xarray.Dataset
            Canonical two-time Dataset (validated here).
        params : Parameters, dict or None
            Starting values, bounds and which parameters vary; varied physics without a
            given value start from estimates read off the data
            (:func:`heterodyne.starts.candidates`), ``contrast`` and ``offset`` left at
            ``None`` from :func:`heterodyne.starts.estimate_scaling`.
        fix : sequence of str
            Names of parameters to hold at their value.
        scaling : {"per_angle", "shared"}
            One contrast/offset pair per angle, or one for all angles.
        multistart : "auto" or int
            With ``"auto"`` the next-best distinct estimates of the data are kept as
            ``alternatives`` (solver vectors).

        Raises
        ------
        ParameterError, OptionError, DataError
            Bad parameters, options or data.
        """
        validate(ds)
        if scaling not in SCALINGS:
            raise OptionError(f"scaling must be one of {SCALINGS}; got {scaling!r}")
        p = Parameters.coerce(params)
        if isinstance(fix, str):
            fix = (fix,)
        p.fix(*fix)
        n_phi = ds.sizes["phi"]
        p.validate(n_phi)
        for message in identifiability_warnings(p):
            warnings.warn(message, stacklevel=3)
        n_pairs = int(pair_counts(ds).sum())
        n_scale = n_phi if scaling == "per_angle" else 1
        v_max = starts.resolvable_velocity(ds)
        if not p["v0"].max_given and p["v0"].max > v_max >= p["v0"].min:
            p["v0"].max = v_max
        p.clip_placeholders()
        estimated = [n for n in PHYSICS_NAMES if p.from_data(n)]
        found = []
        if estimated or multistart == "auto":
            n_found = AUTO_STARTS if multistart == "auto" else 1
            found = starts.candidates(ds, p, n_found, p["v0"].max)
            for name in estimated:
                value = found[0][PHYSICS_INDEX[name]]
                p[name].value = float(np.clip(value, p[name].min, p[name].max))
                p[name].given = False
        estimates = starts.estimate_scaling(ds, p.physics_values())
        values, lower, upper, names, phis, free = [], [], [], [], [], []
        for name in PHYSICS_NAMES:
            par = p[name]
            if par.vary:
                free.append(len(values))
                names.append(name)
                phis.append(np.nan)
                lower.append(par.min)
                upper.append(par.max)
            values.append(float(par.value))
        for name in SCALING_NAMES:
            par = p[name]
            start = (
                estimates[name]
                if par.value is None
                else np.broadcast_to(np.asarray(par.value, dtype=np.float64), (n_phi,))
            )
            start = np.clip(start, par.min, par.max)
            if n_scale == 1:
                start = np.array([np.mean(start)])
            for k in range(n_scale):
                if par.vary:
                    free.append(len(values))
                    names.append(name)
                    phis.append(ds["phi"].values[k] if scaling == "per_angle" else np.nan)
                    lower.append(par.min)
                    upper.append(par.max)
                values.append(float(start[k]))
        if not free:
            raise ParameterError("no parameter varies; nothing to fit")
        if len(free) >= n_pairs:
            raise ParameterError(f"{len(free)} varied parameters but only {n_pairs} finite pairs")
        made = cls(
            ds,
            p,
            n_pairs,
            jax.device_put(np.asarray(values, dtype=np.float64)),
            jax.device_put(np.asarray(free, dtype=np.int32)),
            entries(names, phis),
            np.asarray(lower),
            np.asarray(upper),
            n_scale,
            scaling,
        )
        # with estimated starts the first candidate is x0 itself; given starts are kept
        # and the data's candidates added where they differ
        alternatives = [made.pack(v) for v in found[1 if estimated else 0 :]]
        made.alternatives = [x for x in alternatives if not np.allclose(x, made.x0)]
        return made

    def pack(self, physics: np.ndarray, base=None) -> np.ndarray:
        """``base`` (default ``x0``) with its varied physics entries taken from
        ``physics`` (14,), clipped to the bounds."""
        x = (self.x0 if base is None else np.asarray(base, dtype=float)).copy()
        for k, name in enumerate(self.names):
            if name in PHYSICS_INDEX:
                x[k] = physics[PHYSICS_INDEX[name]]
        return np.clip(x, self.lower, self.upper)

    @property
    def t(self) -> np.ndarray:
        """The frame times [s]."""
        return self.coordinates[0]

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter name of each entry of ``x``."""
        return tuple(self.entries.get_level_values("name"))

    @property
    def labels(self) -> tuple[str, ...]:
        """Display text of each entry of ``x`` (``"v0"``, ``"contrast[60°]"``)."""
        return tuple(entry_label(name, phi) for name, phi in self.entries)

    def physics(self, x) -> np.ndarray:
        """The 14 physics values at the solver vector ``x``."""
        return self.unpack(x)[0]

    def unpack(self, x):
        """``(physics (14,), contrast (n_scale,), offset (n_scale,))`` at the solver
        vector ``x``, the fixed values included."""
        z = np.asarray(self.template).copy()
        z[np.asarray(self.free)] = x
        return unpack(z, self.n_scale)

    def values(self, x) -> xr.Dataset:
        """Every parameter at ``x`` as a ``params`` Dataset: a scalar per physics
        parameter, ``contrast`` and ``offset`` along ``phi``."""
        physics, contrast, offset = self.unpack(x)
        return params_layout(physics, contrast, offset, self.ds["phi"].values, float(self.ds["q"]))

    def from_values(self, values: xr.Dataset) -> np.ndarray:
        """The solver vector ``x`` of a ``params`` Dataset (the inverse of
        :meth:`values`): each varied entry read by name and, per angle, by ``phi``."""
        return at_entries(values, self.entries)

    def errors(self, covariance) -> xr.Dataset:
        """Standard errors ``sqrt(diag covariance)`` in the ``params`` layout, NaN for
        the fixed parameters."""
        blank = params_layout(
            np.full(len(PHYSICS_NAMES), np.nan), np.nan, np.nan, self.ds["phi"].values,
            float(self.ds["q"]),
        )  # fmt: skip
        return assign_entries(blank, self.entries, np.sqrt(np.clip(np.diag(covariance), 0, None)))

    def covariance_array(self, covariance, name: str = "covariance") -> xr.DataArray:
        """A covariance of ``x`` over the stacked ``(name, phi)`` index of its entries,
        dims ``(entry, entry_)``."""
        return stacked(np.asarray(covariance), self.entries, name=name)

    @cached_property
    def padding(self) -> Padding:
        """The packing of the compiled calls, angles padded to their size class."""
        return pad_angles(self.template, self.free, self.n_scale)

    def residuals(self, x):
        """Weighted residuals at all fitted pairs, (n_pairs,)."""
        pad = self.padding
        x, out = _on_device(x, pad.tail), np.empty(self.n_pairs)
        start = 0
        for count, block in pair_blocks(self.pairs):
            r = _block_residuals(x, pad.template, pad.free, block, pad.n_scale)
            out[start : start + count] = np.asarray(r)[:count]
            start += count
        return out

    def cost(self, x) -> float:
        """``0.5 * sum(residuals(x)²)``, the quantity least squares minimises."""
        return float(self.cost_and_gradient(x)[0])

    def gradient(self, x) -> np.ndarray:
        """The gradient of :meth:`cost` in ``x``, ``J^T r`` (exact, by JAX)."""
        return self.cost_and_gradient(x)[1]

    def cost_and_gradient(self, x) -> tuple[float, np.ndarray]:
        """:meth:`cost` and :meth:`gradient` from one evaluation."""
        pad, n = self.padding, np.size(x)
        x = _on_device(x, pad.tail)
        parts = [
            _block_cost_and_gradient(x, pad.template, pad.free, block, pad.n_scale)
            for _, block in pair_blocks(self.pairs)
        ]
        return float(sum(p[0] for p in parts)), np.asarray(sum(p[1] for p in parts))[:n]

    def normal_equations(self, x):
        """``(J^T J, J^T r, r^T r)`` at ``x`` as numpy arrays.

        From the separable form of the model (:mod:`heterodyne.structured`, ``O(N)``
        transcendentals) where its rule allows (weights constant per angle, fewer masked
        pairs than fitted ones), else from the blocked Jacobian; both with the angles
        padded (:attr:`padding`), cut back to the entries of ``x``.
        """
        pad, n = self.padding, np.size(x)
        x = _on_device(x, pad.tail)
        if self.blocks is None:
            out = blocked_normal_equations(x, pad.template, pad.free, self.pairs, pad.n_scale)
        else:
            out = structured.normal_equations(
                x, pad.template, pad.free, self.blocks, pad.n_scale, self.n_physics
            )
        jtj, jtr, rtr = (np.asarray(a) for a in out)
        return jtj[:n, :n], jtr[:n], rtr

    @cached_property
    def pairs(self) -> Pairs:
        """The fitted pairs as flat arrays (:func:`heterodyne.pairs.fitted_pairs`), for the
        paths that read pairs one by one (the blocked Jacobian, CMC, speckle errors, the
        residuals); built on first use and kept."""
        return fitted_pairs(self.ds)

    @property
    def coordinates(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(t [s], phi [deg], q [1/Å])`` of the data."""
        ds = self.ds
        return ds["t1"].values.astype(float), ds["phi"].values.astype(float), float(ds["q"])

    @cached_property
    def blocks(self) -> structured.Blocks | None:
        """The block layout of the pairs for the separable path
        (:func:`heterodyne.structured.blocks`), or ``None`` where its rule does not
        allow it; built on first use and kept."""
        return structured.blocks(self.ds)

    def design(self, n: int, seed: int) -> np.ndarray:
        """``n`` starts from a Latin-hypercube design in the bounds of the varied physics
        parameters (log-uniform for ``LOG_SCALE``); contrast and offset keep ``x0``."""
        if n == 0:
            return np.empty((0, self.x0.size))
        physics = [k for k, name in enumerate(self.names) if name in PHYSICS_INDEX]
        from scipy.stats import qmc  # half a second to import: only where a design is made

        unit = qmc.LatinHypercube(len(physics), seed=seed).random(n)
        points = np.tile(self.x0, (n, 1))
        for column, k in enumerate(physics):
            lo, hi = self.lower[k], self.upper[k]
            if self.names[k] in LOG_SCALE and hi > 0:
                lo_log = np.log10(max(lo, hi * 10.0**-LOG_DECADES))
                points[:, k] = 10.0 ** (lo_log + unit[:, column] * (np.log10(hi) - lo_log))
            else:
                points[:, k] = lo + unit[:, column] * (hi - lo)
        return points

    def errors_at(self, x, jtj, chi2: float, errors: str) -> Errors:
        """Covariance of the varied quantities at ``x`` with ``J^T J = jtj`` and the sum of
        squared weighted residuals ``chi2`` there.

        The nominal one is ``(J^T J)^+``, scaled by ``chi2 / (n_pairs - n_varied)`` when
        the Dataset has no ``sigma``; ``errors="speckle"`` adds the covariance of
        pixel-averaged ``c2`` (:mod:`heterodyne.uncertainty`).
        """
        z = np.asarray(self.template).copy()
        z[np.asarray(self.free)] = x
        physics, contrast, offset = unpack(z, self.n_scale)
        grid = (physics, contrast, offset, *self.coordinates)
        jtj_inverse = pseudo_inverse(jtj)
        nominal = jtj_inverse.copy()
        if "sigma" not in self.ds.data_vars:
            nominal *= chi2 / max(self.n_pairs - x.size, 1)
        covariance, scales = nominal, {}
        if errors == "speckle":
            speckle = uncertainty.speckle_covariance(
                jtj_inverse,
                x,
                self.template,
                self.free,
                self.pairs,
                self.n_scale,
                self.residuals(x),
                uncertainty.intensity_covariance(
                    model.c2_grid_rows(*grid), self.ds["c2"].values, offset
                ),
            )
            covariance = speckle.covariance
            scales = {
                "speckle_kappa": speckle.kappa,
                "shot_kappa": speckle.shot,
                "white_variance": speckle.white,
            }
        return Errors(covariance, nominal, scales, z)


def normalised_eigh(jtj: np.ndarray):
    """Eigen-decomposition of ``J^T J`` with unit diagonal: ``(column norms, eigenvalues,
    eigenvectors, mask of eigenvalues above eps * n * max)``. Normalising first keeps
    parameters of very different units (D0 ~ 1e4, f0 ~ 0.5) from spoiling the
    conditioning; a zero column (a parameter with no effect) gets a zero eigenvalue."""
    scale = np.sqrt(np.diag(jtj))
    inv = safe_inverse(scale)
    eigval, eigvec = np.linalg.eigh(jtj * np.outer(inv, inv))
    keep = eigval > np.finfo(float).eps * jtj.shape[0] * max(eigval.max(), 0.0)
    return scale, eigval, eigvec, keep


def pseudo_inverse(jtj: np.ndarray) -> np.ndarray:
    """``(J^T J)^+`` from :func:`normalised_eigh`: a degenerate direction gives large, not
    infinite, errors."""
    scale, eigval, eigvec, keep = normalised_eigh(jtj)
    inv = safe_inverse(scale)
    normalised = (eigvec[:, keep] / eigval[keep]) @ eigvec[:, keep].T
    return normalised * np.outer(inv, inv)


def safe_inverse(scale):
    """``1 / scale`` where ``scale > 0``, else 0 (a parameter with no effect)."""
    return np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)
