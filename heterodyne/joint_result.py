"""``JointResult``: the outcome of a joint least-squares fit over the q-bins of a Dataset.

It holds the joint ``params`` and ``stderr`` (a scalar per physics parameter, ``contrast``
and ``offset`` along ``(q, phi)``, NaN where a bin lacks the angle), the covariance over
the varied ``(name, q, phi)``, each bin at the joint solution (``bins``, an
:class:`~heterodyne.nlsq_result.NLSQResult` each, with the joint covariance of its
entries) and each bin fitted alone (``separate``), from which the per-q consistency
check is made: :attr:`JointResult.consistency` (each bin's own parameters against the
joint ones) and :attr:`JointResult.rates` (the decay rates against ``q²`` and the phase
rate against ``q``, MODEL.md, "The two-time correlation").
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from heterodyne import model, verdict
from heterodyne.data import time_origin
from heterodyne.errors import OptionError
from heterodyne.joint import COMBINATION
from heterodyne.nlsq_result import NLSQResult
from heterodyne.parameters import PHYSICS_INDEX, PHYSICS_NAMES, SCALING_NAMES, SPECS
from heterodyne.results import RESULT_TYPES, FitResult, read_groups, write_result

# A bin whose own value differs from the joint one by more than this many standard
# deviations of the difference is reported as inconsistent with the joint law.
CONSISTENCY_Z = 3.0
# The consistency z-score's denominator is at least this fraction of the bin's own stderr
# (JointResult.consistency).
DIFFERENCE_FLOOR = 0.5
GROUPS = (
    "params", "stderr", "stderr_nominal", "covariance", "weights", "starts", "data", "settings",
)  # fmt: skip
ARRAY_GROUPS = ("covariance", "weights")
RATES = ("decay_ref", "decay_sample", "phase")
RATE_UNITS = {"decay_ref": "1/s", "decay_sample": "1/s", "phase": "rad/s"}
#: how the bins were weighted (:meth:`heterodyne.joint.JointObjective.reweight`), by errors
WEIGHTING = {"nominal": "inverse residual variance", "speckle": "least sandwich variances"}
#: the errors a joint fit reports, by how it combined the bins (info["combination"])
ERRORS_OF = {
    COMBINATION[False]: "sandwich over the bins",
    COMBINATION[True]: "(sum_k C_k^-1)^-1, C_k each bin's own covariance",
}


def rates_at(physics, t, q):
    """``(q² J_r(t), q² J_s(t), q v(t))`` [1/s, 1/s, rad/s]: the decay rates of the two
    self-terms and the phase rate of the cross term at time ``t`` [s] and wavevector
    ``q`` [1/Å] (MODEL.md, "The two-time correlation": ``exp(-q² ∫J)``,
    ``cos(q cos(phi - phi0) ∫v)``; the phase rate along the flow, ``phi = phi0``)."""
    D0_r, a_r, o_r, D0_s, a_s, o_s, v0, beta, v_off = (physics[k] for k in range(9))
    q2 = q * q
    return jnp.stack(
        [
            q2 * model.transport_rate(t, D0_r, a_r, o_r),
            q2 * model.transport_rate(t, D0_s, a_s, o_s),
            q * model.velocity(t, v0, beta, v_off),
        ]
    )


def _rates_and_errors(physics, covariance, names, t, q):
    """:func:`rates_at` and their standard errors by the delta method, from the
    covariance of the varied physics ``names``."""
    physics = jnp.asarray(physics, dtype=jnp.float64)
    values = np.asarray(rates_at(physics, t, q))
    gradient = np.asarray(jax.jacfwd(rates_at)(physics, t, q))
    columns = [PHYSICS_INDEX[n] for n in names]
    g = gradient[:, columns]
    variance = np.einsum("rp,pq,rq->r", g, np.asarray(covariance), g)
    return values, np.sqrt(np.clip(variance, 0.0, None))


def _physics_covariance(result: NLSQResult):
    """``(names, covariance)`` of the varied physics parameters of a single-bin result."""
    cov = result.covariance
    names = [str(n) for n in cov["name"].values]
    keep = [k for k, n in enumerate(names) if n in PHYSICS_INDEX]
    return [names[k] for k in keep], cov.values[np.ix_(keep, keep)]


@dataclass(frozen=True, repr=False)
class JointResult(FitResult):
    """The outcome of :func:`heterodyne.fit_nlsq` on a multi-q Dataset.

    Attributes
    ----------
    params, stderr, stderr_nominal : xarray.Dataset
        Joint best-fit values and standard errors of the kind ``info["errors"]`` (and the
        nominal ones): a scalar per physics parameter, ``contrast`` and ``offset`` on
        ``(q, phi)``, NaN where a bin lacks the angle (and for fixed parameters).
    covariance : xarray.DataArray
        Covariance of the varied quantities, dims ``(entry, entry_)`` with ``name``,
        ``q`` and ``phi`` coordinates (``q`` NaN for a physics parameter).
    starts : xarray.Dataset
        Every multistart outcome of the joint fit.
    data : xarray.Dataset
        The fitted multi-q Dataset.
    weights : xarray.DataArray
        The weight of each bin's squared residuals in the joint cost, along ``q``
        (:meth:`heterodyne.joint.JointObjective.reweight`; 1 for data with ``sigma``).
    settings : xarray.Dataset
        ``vary``, ``min``, ``max`` of every parameter as fitted.
    bins : tuple of NLSQResult
        Each q-bin at the joint solution (its model, residuals, verdict, plot), with the
        joint covariance of its entries.
    separate : tuple of NLSQResult
        Each q-bin fitted alone from the joint solution (empty with ``separate=False``).
    info : dict
        ``chi2``, ``nfev``, ``success``, ``message``, ``errors``, ``scaling``,
        ``n_pairs``, ``n_varied``, ``n_bins``, ``exchanged``.
    """

    params: xr.Dataset
    stderr: xr.Dataset
    stderr_nominal: xr.Dataset
    covariance: xr.DataArray
    weights: xr.DataArray
    starts: xr.Dataset
    data: xr.Dataset
    settings: xr.Dataset
    bins: tuple = ()
    separate: tuple = ()
    info: dict = field(default_factory=dict)

    @classmethod
    def from_fit(cls, *, objective, x, covariance, nominal, errors, bins, separate, starts, info):
        """The result of the :class:`~heterodyne.joint.JointObjective` ``objective`` at
        ``x`` with the covariances of ``x`` of the kind ``errors`` and nominal."""
        from heterodyne.results import settings_dataset

        index = objective.entries
        coords = {
            "name": ("entry", np.asarray(index.get_level_values("name"), dtype=str)),
            "q": ("entry", np.asarray(index.get_level_values("q"), float), {"units": "1/Å"}),
            "phi": ("entry", np.asarray(index.get_level_values("phi"), float), {"units": "deg"}),
        }
        coords.update({f"{k}_": (("entry_",), *v[1:]) for k, v in coords.items()})
        return cls(
            params=objective.params_layout(x),
            stderr=objective.params_layout(values=np.sqrt(np.clip(np.diag(covariance), 0, None))),
            stderr_nominal=objective.params_layout(
                values=np.sqrt(np.clip(np.diag(nominal), 0, None))
            ),
            covariance=xr.DataArray(
                covariance, dims=("entry", "entry_"), coords=coords, name="covariance"
            ),
            weights=xr.DataArray(
                objective.weights,
                dims="q",
                coords={"q": objective.ds["q"]},
                name="weights",
                attrs={"long_name": "weight of the bin's squared residuals in the joint cost"},
            ),
            starts=starts,
            data=objective.ds,
            settings=settings_dataset(objective.params),
            bins=tuple(bins),
            separate=tuple(separate),
            info={
                **info,
                "errors": errors,
                "scaling": objective.scaling,
                "n_pairs": int(sum(b.info["n_pairs"] for b in bins)),
                "n_varied": len(index),
                "n_bins": len(bins),
            },
        )

    @property
    def chi2(self) -> float:
        return float(self.info["chi2"])

    @property
    def success(self) -> bool:
        return bool(self.info["success"])

    @property
    def reduced_chi2(self) -> float:
        return self.chi2 / max(int(self.info["n_pairs"]) - int(self.info["n_varied"]), 1)

    def value(self, name: str, q: float | None = None, phi: float | None = None) -> float:
        """Joint best-fit value of ``name``; ``q`` [1/Å] and ``phi`` [deg] pick one bin's
        contrast or offset."""
        return value_at(self.params, name, q, phi)

    def error(self, name: str, q: float | None = None, phi: float | None = None) -> float:
        """Joint standard error of ``name`` (at ``q``, ``phi`` for a bin's scaling)."""
        return value_at(self.stderr, name, q, phi)

    @property
    def varied_physics(self) -> list[str]:
        """The physics parameters the fit varied, in the canonical order."""
        names = set(str(n) for n in self.covariance["name"].values)
        return [n for n in PHYSICS_NAMES if n in names]

    @cached_property
    def consistency(self) -> xr.Dataset:
        """Each bin fitted alone against the joint fit, per varied physics parameter.

        Dims ``(q, name)``: ``value`` and ``stderr`` of the bin's own fit, ``joint`` and
        ``joint_stderr``, and ``z = (value - joint) / sqrt(stderr² - joint_stderr²)``:
        the joint estimate uses the bin's data too, so the variance of the difference is
        the difference of the variances, to first order. Where one bin dominates the joint
        estimate that difference goes to 0 while the non-linearity of the model and the
        uncertainty of the errors themselves do not: the denominator is kept at least
        ``DIFFERENCE_FLOOR`` of the bin's own stderr. ``|z| > CONSISTENCY_Z`` marks a bin
        the joint law does not describe. Needs ``separate``.
        """
        if not self.separate:
            raise OptionError(
                "this joint fit has no per-bin fits (fit_nlsq(..., separate=False)); "
                "fit again with separate=True for the consistency check"
            )
        names = self.varied_physics
        value = np.array([[r.value(n) for n in names] for r in self.separate])
        error = np.array([[r.error(n) for n in names] for r in self.separate])
        joint = np.array([self.value(n) for n in names])
        joint_error = np.array([self.error(n) for n in names])
        spread = np.maximum(
            np.sqrt(np.maximum(error**2 - joint_error**2, 0.0)), DIFFERENCE_FLOOR * error
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (value - joint) / spread
        dims = ("q", "name")
        return xr.Dataset(
            {
                "value": (dims, value),
                "stderr": (dims, error),
                "joint": ("name", joint),
                "joint_stderr": ("name", joint_error),
                "z": (dims, z),
            },
            coords={"q": self.params["q"], "name": names},
            attrs={"threshold": CONSISTENCY_Z},
        )

    @cached_property
    def rates(self) -> xr.Dataset:
        """The decay and phase rates of each bin against the joint law, at the middle
        frame time ``t_mid`` (:func:`rates_at`): ``decay_ref``, ``decay_sample``
        (``q² J(t_mid)``, 1/s, which the model makes proportional to ``q²``) and ``phase``
        (``q v(t_mid)``, rad/s, proportional to ``q``), each bin's own fit (``<rate>``,
        ``<rate>_stderr``) and the joint law at its ``q`` (``<rate>_joint``,
        ``<rate>_joint_stderr``), by the delta method. Needs ``separate``."""
        if not self.separate:
            raise OptionError(
                "this joint fit has no per-bin fits (fit_nlsq(..., separate=False)); "
                "fit again with separate=True for the rates of each bin"
            )
        t = self.data["t1"].values
        t_mid = float(0.5 * (t[0] + t[-1]))
        q = self.params["q"].values
        joint_physics = np.array([self.value(n) for n in PHYSICS_NAMES])
        names = self.varied_physics
        rows = self.covariance["name"].values
        keep = [k for k, n in enumerate(rows) if n in PHYSICS_INDEX]
        joint_cov = self.covariance.values[np.ix_(keep, keep)]
        own, own_err, law, law_err = (np.zeros((q.size, len(RATES))) for _ in range(4))
        for k, result in enumerate(self.separate):
            physics = np.array([result.value(n) for n in PHYSICS_NAMES])
            bin_names, cov = _physics_covariance(result)
            own[k], own_err[k] = _rates_and_errors(physics, cov, bin_names, t_mid, q[k])
            law[k], law_err[k] = _rates_and_errors(joint_physics, joint_cov, names, t_mid, q[k])
        variables = {}
        for r, name in enumerate(RATES):
            attrs = {"units": RATE_UNITS[name]}
            variables[name] = ("q", own[:, r], attrs)
            variables[f"{name}_stderr"] = ("q", own_err[:, r], attrs)
            variables[f"{name}_joint"] = ("q", law[:, r], attrs)
            variables[f"{name}_joint_stderr"] = ("q", law_err[:, r], attrs)
        return xr.Dataset(
            variables, coords={"q": self.params["q"]}, attrs={"t_mid": t_mid, "units_t": "s"}
        )

    def inconsistent(self) -> list[str]:
        """``"name at q = ..."`` for each bin and parameter with ``|z| > CONSISTENCY_Z``."""
        if not self.separate:
            return []
        c = self.consistency
        return [
            f"{n} at q = {float(qk):.4g} 1/Å (z = {float(c['z'].sel(q=qk, name=n)):+.1f})"
            for qk in c["q"].values
            for n in c["name"].values
            if abs(float(c["z"].sel(q=qk, name=n))) > CONSISTENCY_Z
        ]

    def report(self) -> str:
        """A text report: the joint fit, its physics, each bin's scaling and fit, and the
        per-q consistency check."""
        info = self.info
        combination = info.get("combination", COMBINATION[False])
        q = self.params["q"].values
        lines = [
            "[[Joint NLSQ fit]]",
            f"    q-bins            {len(q)}: q = {', '.join(f'{v:.4g}' for v in q)} 1/Å",
            "    method            scipy least_squares (trf) on the summed normal equations",
            f"    errors            {info['errors']} ({ERRORS_OF[combination]})",
            f"    bins combined     by {combination}",
            f"    scaling           {info['scaling']}, per q-bin",
            f"    pairs fitted      {info['n_pairs']}",
            f"    times             {time_origin(self.data)}",
            f"    varied            {info['n_varied']}",
            f"    bin weights       {', '.join(f'{w:.3g}' for w in self.weights.values)} "
            f"({WEIGHTING.get(info['errors'], 'inverse residual variance')}, mean 1"
            f"{'' if combination == COMBINATION[False] else '; of the least-squares start'})",
            f"    chi2              {self.chi2:.6g} (unweighted sum over the bins)",
            f"    reduced chi2      {self.reduced_chi2:.6g}",
            f"    evaluations       {info['nfev']}",
            f"    success           {self.success}: {info['message']}",
            "[[Physics]] (shared by all q-bins)",
            f"    {'name':<16}{'value':>13}{'stderr':>12}{'rel.':>10}  unit",
        ]
        for name in PHYSICS_NAMES:
            value, error = self.value(name), self.error(name)
            rel = f"{100 * error / abs(value):.2f}%" if np.isfinite(error) and value else ""
            err = f"{error:.4g}" if np.isfinite(error) else "fixed"
            lines.append(f"    {name:<16}{value:>13.6g}{err:>12}{rel:>10}  {SPECS[name].unit}")
        lines.append("[[Bins]] (each at the joint solution)")
        lines.append(f"    {'q [1/Å]':<10}{'phi [deg]':<22}{'reduced chi2':>13}  verdict")
        for result in self.bins:
            angles = ", ".join(f"{v:g}" for v in result.params["phi"].values)
            lines.append(
                f"    {float(result.params['q']):<10.4g}{angles:<22}"
                f"{result.reduced_chi2:>13.4g}  {result.verdict.status}"
            )
        lines.append("[[Scaling]] (contrast, offset per q-bin and angle)")
        for k, result in enumerate(self.bins):
            for phi in result.params["phi"].values:
                c = [result.value(n, phi=phi) for n in SCALING_NAMES]
                e = [result.error(n, phi=phi) for n in SCALING_NAMES]
                lines.append(
                    f"    q {q[k]:<8.4g} phi {phi:<7g} contrast {c[0]:.5g} ± {e[0]:.2g}, "
                    f"offset {c[1]:.6g} ± {e[1]:.2g}"
                )
        if self.separate:
            c = self.consistency
            lines.append(
                f"[[Consistency]] each q-bin alone vs the joint fit (|z| > {CONSISTENCY_Z:g} "
                "flagged)"
            )
            for n in c["name"].values:
                lines.append(
                    f"    {n}: joint {float(c['joint'].sel(name=n)):.5g} ± "
                    f"{float(c['joint_stderr'].sel(name=n)):.2g}"
                )
                for qk in c["q"].values:
                    row = c.sel(q=qk, name=n)
                    lines.append(
                        f"        q {qk:<8.4g} {float(row['value']):>12.5g} ± "
                        f"{float(row['stderr']):<10.2g} z {float(row['z']):+.2f}"
                    )
            r = self.rates
            lines.append(
                f"[[Rates]] at t_mid = {r.attrs['t_mid']:.4g} s: each bin alone | joint law "
                "(decay ∝ q², phase ∝ q)"
            )
            for qk in r["q"].values:
                row = r.sel(q=qk)
                parts = [
                    f"{name} {float(row[name]):.4g} ± {float(row[name + '_stderr']):.2g} | "
                    f"{float(row[name + '_joint']):.4g}"
                    for name in RATES
                ]
                lines.append(f"    q {qk:<8.4g} " + "; ".join(parts))
        warnings = self.warnings()
        if warnings:
            lines.append("[[Warnings]]")
            lines += [f"    - {w}" for w in warnings]
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What the user must know before trusting the joint physics: a mirror flow that
        the angles of all bins together cannot exclude (:func:`heterodyne.verdict.mirror_flow`)
        and the bins inconsistent with the joint fit."""
        physics = np.array([self.value(n) for n in PHYSICS_NAMES])
        angles = np.concatenate([b.params["phi"].values for b in self.bins])
        return verdict.mirror_flow(physics, angles, self.settings) + [
            f"inconsistent with the joint fit: {f}" for f in self.inconsistent()
        ]

    def __repr__(self):
        return (
            f"<JointResult bins={self.info['n_bins']} success={self.success} "
            f"reduced_chi2={self.reduced_chi2:.4g}>"
        )

    def _repr_html_(self):
        return f"<pre>{html.escape(self.report())}</pre>"

    def plot(self):
        """The per-q consistency check and the rates against ``q²`` and ``q``
        (:func:`heterodyne.plot.joint`); ``result.bins[k].plot()`` shows one bin's fit."""
        from heterodyne import plot

        return plot.joint(self)

    def to_netcdf(self, path, *, overwrite: bool = False):
        """Write the whole result (each bin's results in groups ``bin_<k>`` and
        ``separate_<k>``) to one netCDF-4 file; ``hd.open_result`` reads it back."""
        groups = {
            name: getattr(self, name).to_dataset() if name in ARRAY_GROUPS else getattr(self, name)
            for name in GROUPS
        }
        for kind in ("bins", "separate"):
            for k, result in enumerate(getattr(self, kind)):
                root = f"{kind.rstrip('s')}_{k}"
                groups[root] = xr.Dataset(attrs=result.info)
                for name, part in result.groups().items():
                    groups[f"{root}/{name}"] = part
        info = {**self.info, "n_separate": len(self.separate)}
        return write_result("JointResult", info, groups, path, overwrite=overwrite)

    @classmethod
    def _from_tree(cls, tree):
        groups, info = read_groups(tree)
        n_separate = int(info.pop("n_separate"))
        parts = {
            kind: tuple(
                NLSQResult._from_tree(tree[f"{kind.rstrip('s')}_{k}"]) for k in range(count)
            )
            for kind, count in (("bins", int(info["n_bins"])), ("separate", n_separate))
        }
        return cls(
            **{
                name: groups[name][name] if name in ARRAY_GROUPS else groups[name]
                for name in GROUPS
            },
            **parts,
            info=info,
        )


def value_at(ds: xr.Dataset, name: str, q, phi) -> float:
    """One value of the joint ``params`` layout."""
    if name not in ds.data_vars:
        raise OptionError(f"no quantity {name!r}; the result holds {', '.join(ds.data_vars)}")
    var = ds[name]
    if "q" not in var.dims:
        if q is not None or phi is not None:
            raise OptionError(f"{name} is shared by all q-bins; call without q and phi")
        return float(var)
    if q is None or phi is None:
        raise OptionError(
            f"{name} has one value per q-bin and angle: give q (one of "
            f"{', '.join(f'{v:.4g}' for v in var['q'].values)} 1/Å) and phi"
        )
    return float(var.sel(q=q, phi=phi, method="nearest"))


RESULT_TYPES["JointResult"] = JointResult
