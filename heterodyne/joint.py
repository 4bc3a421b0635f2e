"""Joint least squares over the q-bins of a multi-q Dataset: shared physics, per-bin scaling.

The 14 physics parameters are q-independent (rates in Å²/s, velocities in Å/s; ``q``
enters the model explicitly, MODEL.md), so every q-bin constrains the same numbers. The
joint fit minimises the sum over bins of each bin's cost (:class:`Objective` of that bin,
with its own ``q``, angles, contrasts and offsets)::

    chi2(theta, {c_k, o_k}) = sum_k | r_k(theta, c_k, o_k) |²

in the solver vector ``x = [varied physics (P), scaling of bin 0 (S_0), bin 1 ...]``.
A bin's residuals depend on the physics and its own scaling only, so the normal
equations are the sums of the bins' (each from the fast structured path,
:mod:`heterodyne.structured`), embedded at the bin's columns::

    J^T J = sum_k E_k (J_k^T J_k) E_k^T,   J^T r = sum_k E_k J_k^T r_k,   r^T r = sum_k r_k^T r_k

``E_k`` the embedding of bin ``k``'s columns (physics, then its own scaling): cost linear in
the number of bins, one compiled program per bin shape.

Errors (sandwich): a bin's covariance ``C_k`` of its own kind (nominal, scaled by its own
residual variance where the data carry no ``sigma``; or speckle, :mod:`heterodyne.uncertainty`)
gives its score covariance ``M_k = H_k C_k H_k`` (``H_k = J_k^T J_k``; exact with the
pseudo-inverse, since ``M_k`` lies in the range of ``H_k``). The bins' noise is independent
(different pixels), so ``Cov = H^+ (sum_k E_k M_k E_k^T) H^+`` with ``H = J^T J``. With
``sigma`` given, ``M_k = H_k`` and ``Cov = H^+``: the joint information is the sum of the
bins' informations.

Weights: :func:`heterodyne.fit_nlsq` fits once with the bins weighted alike, then (data
without ``sigma``) weights each bin (:meth:`JointObjective.reweight`) and fits again from
that solution: ``chi2 = sum_k w_k |r_k|²``, ``J^T J = sum_k w_k E_k H_k E_k^T``, and the
sandwich::

    Cov(w) = (sum_k w_k E_k H_k E_k^T)^+ (sum_k w_k² E_k M_k E_k^T) (sum_k w_k E_k H_k E_k^T)^+

(unchanged by a common factor of the ``w_k``). For one physics parameter, with ``s_k``
its information in bin ``k`` once the bin's scaling is profiled out and ``m_k`` that
bin's score variance of it, ``Cov = sum_k w_k² m_k / (sum_k w_k s_k)²``: least at
``w_k ∝ s_k / m_k``, where it is ``1 / sum_k (1 / var_k)`` with ``var_k = m_k / s_k²``
the bin's own variance (the inverse-variance combination of the bins). With nominal
errors ``M_k = sigma_k² H_k`` and that optimum is the inverse residual variance,
``w_k = 1 / sigma_k²``, for every parameter at once. With speckle errors
(``M_k`` not proportional to ``H_k``) the weights minimise
``sum_i log Cov(w)_ii`` over the varied physics ``i`` (:func:`optimal_weights`), a
criterion free of the parameters' units.

Combination: one weight per bin cannot give each physics direction the weight its noise
asks for when the bins' noise differs in shape (speckle: ``M_k`` not proportional to
``H_k``). With ``errors="speckle"``, :func:`heterodyne.fit_nlsq` therefore ends with the
generalised least-squares combination of the bins' own estimates ``theta_k`` (each of
covariance ``C_k``, its scaling profiled out)::

    theta = (sum_k C_k^-1)^-1 sum_k C_k^-1 theta_k,    Cov(theta) = (sum_k C_k^-1)^-1

the least variance of any combination of independent bins' estimates (matrix weights,
which include every ``w_k``). It is reached from the weighted least-squares solution by
Gauss-Newton steps of every bin (:meth:`JointObjective.combine`, :func:`combination`), so
that a bin whose own fit is degenerate in some direction adds nothing there rather than
a fit of its own that wandered off.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import xarray as xr
from scipy import optimize

from heterodyne import qbins
from heterodyne.objective import Objective, pseudo_inverse
from heterodyne.parameters import PHYSICS_INDEX, PHYSICS_NAMES, SCALING_NAMES, Parameters

# The inverse-covariance combination (JointObjective.combine) stops when every entry moves
# by less than this fraction of its standard error, after at most COMBINE_STEPS steps.
COMBINE_TOLERANCE = 1e-3
COMBINE_STEPS = 8
#: how a joint solution combines the bins, by ``JointObjective.combined``
COMBINATION = {False: "weighted least squares", True: "inverse covariance of the bins' fits"}


def entries(names, qs, phis) -> pd.MultiIndex:
    """The ``(name, q, phi)`` index of jointly fitted quantities: ``q`` [1/Å] and ``phi``
    [deg] of one bin's contrast or offset, NaN for a physics parameter (shared by all
    bins) and ``phi`` NaN for a bin's shared scaling."""
    return pd.MultiIndex.from_arrays(
        [np.asarray(names, dtype=str), np.asarray(qs, float), np.asarray(phis, float)],
        names=("name", "q", "phi"),
    )


class JointObjective:
    """The least-squares objective of all q-bins of a multi-q Dataset together.

    Holds one :class:`~heterodyne.objective.Objective` per bin (``bins``) and the index of
    each bin's solver entries in the joint vector (``columns``); :meth:`normal_equations`
    sums the bins'. It offers what :func:`heterodyne.nlsq.solve` reads of an objective
    (``normal_equations``, ``lower``, ``upper``) and the packing helpers of
    :class:`~heterodyne.objective.Objective` (``pack``, ``design``, ``names``).

    Attributes
    ----------
    ds : xarray.Dataset
        The multi-q data.
    bins : list of Objective
        One per q-bin, in order of ``q``.
    columns : list of numpy.ndarray
        For bin ``k``, the joint entries of its solver vector (physics first).
    entries : pandas.MultiIndex
        ``(name, q, phi)`` of each joint entry.
    """

    pack = Objective.pack
    design = Objective.design
    names = Objective.names

    def __init__(self, ds, bins, columns, index, lower, upper, x0, scaling):
        self.ds, self.bins, self.columns, self.entries = ds, bins, columns, index
        self.lower, self.upper, self.x0, self.scaling = lower, upper, x0, scaling
        self.params = bins[0].params
        self.n_physics = bins[0].n_physics
        self.alternatives = []
        #: the weight of each bin's squared residuals (1 until :meth:`reweight`)
        self.weights = np.ones(len(bins))
        #: whether the solution is the bins' inverse-covariance combination (:meth:`combine`)
        self.combined = False

    @classmethod
    def build(cls, ds, params=None, *, fix=(), scaling="per_angle", multistart=0):
        """The joint objective of the multi-q Dataset ``ds`` (validated here).

        The starting physics is read off the data of the middle q-bin (as
        :meth:`Objective.build` reads it off one bin: its rates are the most typical of the
        file's, and reading every bin would cost as much as the fit); every bin is then
        built from that physics, its contrast and offset solved for given it
        (:func:`heterodyne.starts.estimate_scaling`). The joint bounds of a physics
        parameter are the tightest of the bins' (``v0``'s default upper bound, the speed
        the frame rate resolves, ``pi / (q dt)``, is set by the largest ``q``). With
        ``multistart="auto"`` the middle bin's further distinct starts are kept as
        ``alternatives``.
        """
        parts = qbins.checked_bins(ds)
        middle_index = len(parts) // 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            middle = Objective.build(
                parts[middle_index], params, fix=fix, scaling=scaling, multistart=multistart
            )
            n_physics = middle.n_physics
            physics_names = list(middle.names[:n_physics])
            start = middle.physics(middle.x0)
            shared = Parameters.coerce(params)
            shared.fix(*((fix,) if isinstance(fix, str) else fix))
            for name in physics_names:
                shared[name].value = float(start[PHYSICS_INDEX[name]])
            objectives = [
                middle if k == middle_index else Objective.build(one, shared, scaling=scaling)
                for k, one in enumerate(parts)
            ]
        # the bins share the parameters, hence their degeneracy warnings: each once
        for message in dict.fromkeys(str(w.message) for w in caught):
            warnings.warn(message, stacklevel=3)
        lower = np.max([o.lower[:n_physics] for o in objectives], axis=0)
        upper = np.min([o.upper[:n_physics] for o in objectives], axis=0)

        names, qs, phis = list(physics_names), [np.nan] * n_physics, [np.nan] * n_physics
        columns, lo, hi = [], [lower], [upper]
        x0 = [np.clip(middle.x0[:n_physics], lower, upper)]
        size = n_physics
        for one, objective in zip(parts, objectives, strict=True):
            own = len(objective.entries) - n_physics
            columns.append(np.concatenate([np.arange(n_physics), size + np.arange(own)]))
            size += own
            x0.append(objective.x0[n_physics:])
            lo.append(objective.lower[n_physics:])
            hi.append(objective.upper[n_physics:])
            for name, phi in list(objective.entries)[n_physics:]:
                names.append(name)
                qs.append(float(one["q"]))
                phis.append(phi)
        made = cls(
            ds,
            objectives,
            columns,
            entries(names, qs, phis),
            np.concatenate(lo),
            np.concatenate(hi),
            np.concatenate(x0),
            scaling,
        )
        alternatives = [made.pack(middle.physics(x)) for x in middle.alternatives]
        made.alternatives = [x for x in alternatives if not np.allclose(x, made.x0)]
        return made

    def split(self, x) -> list[np.ndarray]:
        """Each bin's solver vector at the joint vector ``x``."""
        x = np.asarray(x, float)
        return [x[c] for c in self.columns]

    def physics(self, x) -> np.ndarray:
        """The 14 physics values at ``x``."""
        return self.bins[0].physics(self.split(x)[0])

    @property
    def t(self) -> np.ndarray:
        """The frame times [s], shared by the bins."""
        return self.bins[0].t

    def normal_equations(self, x):
        """``(J^T J, J^T r, r^T r)`` at ``x``: the bins' sums, embedded (module docstring),
        each bin's weighted by its entry of ``weights``."""
        size = len(self.entries)
        jtj, jtr, rtr = np.zeros((size, size)), np.zeros(size), 0.0
        for objective, column, part, w in self._parts(x):
            a, b, c = objective.normal_equations(part)
            jtj[np.ix_(column, column)] += w * a
            jtr[column] += w * b
            rtr += w * float(c)
        return jtj, jtr, rtr

    def _parts(self, x):
        return zip(self.bins, self.columns, self.split(x), self.weights, strict=True)

    def reweight(self, x, errors: str = "nominal") -> np.ndarray:
        """Set ``weights`` for the errors of kind ``errors`` at ``x`` (normalised to mean
        1) and return them.

        Bins differ in noise (count rates, speckle contrast and the decay of ``c2`` all
        change with ``q``). With ``errors="nominal"`` each bin is weighted by its inverse
        residual variance, ``(n_k - p_k) / chi2_k``: the weights that minimise every
        physics variance of the sandwich (module docstring) when the pairs' noise is
        independent. Otherwise the bins' own covariances give ``M_k`` and the weights are
        :func:`optimal_weights`, started from the inverse residual variances. For data
        that carry ``sigma`` the weights stay 1: ``sigma`` already weights them.
        """
        if "sigma" in self.ds.data_vars:
            return self.weights
        variance, hessians, meats = [], [], []
        for objective, _, part, _ in self._parts(x):
            own, _, rtr = objective.normal_equations(part)
            variance.append(float(rtr) / max(objective.n_pairs - part.size, 1))
            if errors != "nominal":
                covariance = objective.errors_at(part, own, float(rtr), errors).covariance
                hessians.append(own)
                meats.append(own @ covariance @ own)
        weights = 1.0 / np.asarray(variance)
        if errors != "nominal":
            weights = optimal_weights(
                hessians, meats, self.columns, len(self.entries), self.n_physics, weights
            )
        self.weights = weights / weights.mean()
        return self.weights

    def combine(self, x, errors: str) -> np.ndarray | None:
        """The inverse-covariance combination of the bins' own fits, refined from the
        joint solution ``x``; ``None`` (and ``combined`` left false) where its steps do
        not settle within ``COMBINE_STEPS``.

        Each bin's own fit, one Gauss-Newton step from ``x``, is ``x_k - H_k^+ g_k``
        (``g_k = J_k^T r_k``); with its covariance ``C_k`` of the kind ``errors`` at ``x``
        the combination (:func:`combination`, ``L``) moves the physics by the physics rows
        of ``L [-H_0^+ g_0; -H_1^+ g_1; ...]`` and each bin's scaling to its optimum given
        that physics. Steps are repeated, ``L`` held, until every
        entry moves by less than ``COMBINE_TOLERANCE`` of its standard error: the root
        of ``sum_k C_k^-1 (H_k^+ g_k)_physics = 0`` with each bin's scaling at its own
        optimum. A step is clipped to the bounds.
        """
        x = np.asarray(x, float)
        hessians, covariances, gradients = [], [], []
        for objective, _, part, _ in self._parts(x):
            h, g, chi2 = objective.normal_equations(part)
            hessians.append(h)
            gradients.append(g)
            covariances.append(objective.errors_at(part, h, float(chi2), errors).covariance)
        mapping = combination(hessians, covariances, self.columns, self.n_physics)
        error = np.sqrt(np.clip(np.diag(spread(mapping, covariances)), 0.0, None))
        p = self.n_physics
        for _ in range(COMBINE_STEPS):
            own = [-pseudo_inverse(h) @ g for h, g in zip(hessians, gradients, strict=True)]
            step = np.zeros_like(x)
            step[:p] = mapping[:p] @ np.concatenate(own)
            # each bin's scaling to its optimum given the new physics, from its Hessian
            # here: L's rows for it hold the start's, stale where a bin's own fit would
            # move far from the joint one
            for h, g, column in zip(hessians, gradients, self.columns, strict=True):
                step[column[p:]] = -pseudo_inverse(h[p:, p:]) @ (g[p:] + h[p:, :p] @ step[:p])
            if not np.all(np.isfinite(step)):
                return None
            x = np.clip(x + step, self.lower, self.upper)
            if np.all(np.abs(step) <= COMBINE_TOLERANCE * error):
                self.combined = True
                return x
            found = [o.normal_equations(part) for o, _, part, _ in self._parts(x)]
            hessians, gradients = [f[0] for f in found], [f[1] for f in found]
        return None

    def errors_at(self, x, errors: str):
        """``(covariance, nominal, per_bin)`` at ``x``: the joint covariance for the kind
        ``errors`` and the nominal one, and each bin's
        :class:`~heterodyne.objective.Errors` (its model, residuals and scales). After
        :meth:`combine` the covariance is that of the inverse-covariance combination
        (:func:`combination`), else the sandwich of the weighted least squares
        (:func:`sandwich`, module docstring)."""
        hessians, per_bin = [], []
        for objective, _, part, _ in self._parts(x):
            own, _, chi2 = objective.normal_equations(part)
            hessians.append(own)
            per_bin.append(objective.errors_at(part, own, float(chi2), errors))
        chosen = [found.covariance for found in per_bin]
        nominal = [found.nominal for found in per_bin]
        if self.combined:
            found = combined_covariances(hessians, [chosen, nominal], self.columns, self.n_physics)
        else:
            found = [
                sandwich(
                    self.weights,
                    hessians,
                    [h @ c @ h for h, c in zip(hessians, kind, strict=True)],
                    self.columns,
                    len(self.entries),
                )
                for kind in (chosen, nominal)
            ]
        covariance, nominal = (0.5 * (c + c.T) for c in found)
        return covariance, nominal, per_bin

    def params_layout(self, x=None, values=None) -> xr.Dataset:
        """The joint ``params`` layout: a scalar per physics parameter, ``contrast`` and
        ``offset`` along ``(q, phi)`` (NaN where a bin lacks the angle). From the solver
        vector ``x`` (fixed values included), or ``values`` per entry (NaN elsewhere)."""
        q, phi = self.ds["q"].values, self.ds["phi"].values
        if x is not None:
            physics = self.physics(x)
            grids = {n: np.full((q.size, phi.size), np.nan) for n in SCALING_NAMES}
            for k, (objective, part) in enumerate(zip(self.bins, self.split(x), strict=True)):
                _, contrast, offset = objective.unpack(part)
                at = np.searchsorted(phi, objective.ds["phi"].values)
                for name, value in zip(SCALING_NAMES, (contrast, offset), strict=True):
                    grids[name][k, at] = value
        else:
            physics = np.full(len(PHYSICS_NAMES), np.nan)
            grids = {n: np.full((q.size, phi.size), np.nan) for n in SCALING_NAMES}
            for (name, qk, ph), value in zip(self.entries, values, strict=True):
                if np.isnan(qk):
                    physics[PHYSICS_INDEX[name]] = value
                    continue
                k = int(np.argmin(np.abs(q - qk)))
                if np.isnan(ph):
                    grids[name][k, np.isin(phi, self.bins[k].ds["phi"].values)] = value
                else:
                    grids[name][k, int(np.argmin(np.abs(phi - ph)))] = value
        return layout(physics, grids["contrast"], grids["offset"], q, phi)


def sandwich(weights, hessians, meats, columns, size: int) -> np.ndarray:
    """``Cov(w)`` of the module docstring: the joint sandwich of bins with Hessians
    ``H_k``, score covariances ``M_k`` (each over its bin's ``columns`` of the ``size``
    joint entries) and weights ``w_k``."""
    bread, meat = np.zeros((size, size)), np.zeros((size, size))
    for w, h, m, column in zip(weights, hessians, meats, columns, strict=True):
        block = np.ix_(column, column)
        bread[block] += w * h
        meat[block] += w * w * m
    inverse = pseudo_inverse(bread)
    return inverse @ meat @ inverse


def combination(hessians, covariances, columns, n_physics: int) -> np.ndarray:
    """The map ``L`` from the bins' own errors to those of their inverse-covariance
    combination: ``delta x = L [e_0; e_1; ...]``, ``e_k`` bin ``k``'s own solver vector
    (its ``columns`` of the joint one; physics first) minus the truth, ``C_k`` its
    covariance and ``H_k`` its ``J^T J`` (``hessians``).

    Physics (``theta``, the first ``n_physics`` entries): with ``I_k = (C_k^theta)^+`` the
    inverse of the physics block of ``C_k`` (the bin's scaling profiled out)::

        delta theta = (sum_k I_k)^+ sum_k I_k e_k^theta

    the generalised least-squares combination of the bins' estimates, of covariance
    ``(sum_k I_k)^+`` for independent bins. Bin ``k``'s scaling ``s`` is its own optimum
    given that physics, ``H_ss delta s + H_s,theta delta theta = H_ss e^s + H_s,theta
    e^theta``, i.e. ``delta s = e^s + H_ss^+ H_s,theta (e^theta - delta theta)``.
    """
    p = n_physics
    size = 1 + max(int(np.max(c)) for c in columns)
    offsets = np.cumsum([0] + [len(c) for c in columns])
    mapping = np.zeros((size, offsets[-1]))
    informations = [pseudo_inverse(c[:p, :p]) for c in covariances]
    total = pseudo_inverse(sum(informations)) if p else np.zeros((0, 0))
    for information, start in zip(informations, offsets, strict=False):
        mapping[:p, start : start + p] = total @ information
    for h, column, start, end in zip(hessians, columns, offsets, offsets[1:], strict=False):
        own = column[p:]
        coupling = pseudo_inverse(h[p:, p:]) @ h[p:, :p]
        mapping[own, start + p : end] += np.eye(own.size)
        mapping[own, start : start + p] += coupling
        mapping[own] -= coupling @ mapping[:p]
    return mapping


def spread(mapping, covariances) -> np.ndarray:
    """``L diag(C_0, C_1, ...) L^T``: the covariance of ``L e`` for independent bins'
    errors ``e_k`` of covariances ``C_k`` (:func:`combination`)."""
    sizes = np.cumsum([0] + [c.shape[0] for c in covariances])
    out = np.zeros((mapping.shape[0], mapping.shape[0]))
    for c, start, end in zip(covariances, sizes, sizes[1:], strict=False):
        part = mapping[:, start:end]
        out += part @ c @ part.T
    return 0.5 * (out + out.T)


def combined_covariances(hessians, kinds, columns, n_physics: int) -> list[np.ndarray]:
    """The covariance of the inverse-covariance combination (:func:`combination`, built
    with the first of ``kinds``, each a list of the bins' covariances) under each kind."""
    mapping = combination(hessians, kinds[0], columns, n_physics)
    return [spread(mapping, kind) for kind in kinds]


def optimal_weights(hessians, meats, columns, size: int, n_physics: int, start) -> np.ndarray:
    """The bin weights ``w > 0`` that minimise ``sum_i log Cov(w)_ii`` over the first
    ``n_physics`` joint entries (the varied physics; :func:`sandwich`), searched over
    ``log w`` from ``start`` (BFGS; the first weight held, since a common factor leaves
    ``Cov`` unchanged). Entries without variance at ``start`` are left out; the result is
    never worse than ``start``."""
    start = np.asarray(start, float)
    if start.size < 2:
        return start
    diagonal = np.diag(sandwich(start, hessians, meats, columns, size))[:n_physics]
    shown = np.flatnonzero(np.isfinite(diagonal) & (diagonal > 0))
    if shown.size == 0:
        return start
    base = np.log(start / start[0])

    def criterion(z):
        weights = np.exp(np.concatenate([[0.0], z]))
        variance = np.diag(sandwich(weights, hessians, meats, columns, size))[shown]
        return float(np.sum(np.log(variance))) if np.all(variance > 0) else np.inf

    found = optimize.minimize(criterion, base[1:], method="BFGS", options={"gtol": 1e-10})
    if not np.isfinite(found.fun) or found.fun > criterion(base[1:]):
        return start
    return start[0] * np.exp(np.concatenate([[0.0], found.x]))


def layout(physics, contrast, offset, q, phi) -> xr.Dataset:
    """The joint ``params``/``stderr`` layout (:meth:`JointObjective.params_layout`)."""
    from heterodyne.parameters import UNITS

    variables = {
        name: ((), float(physics[k]), {"units": UNITS[name]})
        for k, name in enumerate(PHYSICS_NAMES)
    }
    for name, value in (("contrast", contrast), ("offset", offset)):
        variables[name] = (("q", "phi"), np.asarray(value, float), {"units": UNITS[name]})
    coords = {
        "q": ("q", np.asarray(q, float), {"units": "1/Å"}),
        "phi": ("phi", np.asarray(phi, float), {"units": "deg"}),
    }
    return xr.Dataset(variables, coords=coords)
