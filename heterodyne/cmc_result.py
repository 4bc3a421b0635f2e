"""``CMCResult``: the outcome of a consensus Monte Carlo run, saved and reopened without
loss. Its posterior is ArviZ data; the diagnostics, prior, start values and settings sit
beside it as Datasets.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from heterodyne import diagnostics, verdict
from heterodyne.data import time_origin
from heterodyne.parameters import PHYSICS_NAMES, UNITS
from heterodyne.results import (
    RESULT_TYPES,
    FitResult,
    at_entries,
    entries,
    entry_label,
    identifiability_warnings,
    index_of,
    params_layout,
    read_groups,
    warning_lines,
    write_result,
)

# The groups of CMCResult.posterior (an arviz.InferenceData), in the order they are written.
CMC_POSTERIOR_GROUPS = ("posterior", "sample_stats", "observed_data", "shard_posterior")
_LIKELIHOOD_WORDS = {"rows": "whole rows", "pairs": "pair by pair"}
# Written when present: the combined draws before the errors="speckle" correction.
CMC_OPTIONAL_GROUPS = ("uncorrected_posterior",)
# The groups of the other fields of CMCResult but info.
CMC_GROUPS = ("diagnostics", "prior", "start", "settings")
# A log-space parameter whose 94 % HDI starts below this multiple of its floor is
# reported as consistent with 0.
FLOOR_NOTE = 10.0
# A posterior whose sd in the sampled space exceeds this fraction of its prior's sd is
# reported as prior-dominated: the data shrank the prior by less than a factor 2.
PRIOR_DOMINATED = 0.5


@dataclass(frozen=True, repr=False)
class CMCResult(FitResult):
    """The outcome of :func:`heterodyne.fit_cmc`.

    Attributes
    ----------
    posterior : arviz.InferenceData
        ``posterior``: the combined draws ``(chain, draw)``, one variable per varied
        parameter (``contrast``, ``offset`` and a sampled ``noise`` along ``phi``);
        ``sample_stats``: NUTS statistics of every shard ``(shard, chain, draw)``
        (``energy``, ``diverging``, ``n_steps``, ``acceptance_rate``, ``step_size``,
        ``lp``; the combined draws come from no sampler of their own);
        ``observed_data``: the fitted Dataset; ``shard_posterior``: each shard's draws
        ``(shard, chain, draw)``; with ``errors="speckle"``, ``uncorrected_posterior``:
        the combined draws before the correction for correlated errors.
    diagnostics : xarray.Dataset
        ``rhat``, ``ess_bulk``, ``ess_tail`` by ``(shard, entry)`` (``entry`` the stacked
        ``(name, phi)`` index), ``bfmi`` by
        ``(shard, chain)``, ``divergences``, ``divergent_fraction``, ``n_pairs`` and
        ``seconds`` by shard; the thresholds in attrs
        (:mod:`heterodyne.diagnostics`).
    prior : xarray.Dataset
        Each sampled quantity's space (log or linear), prior kind, bounds (physical
        units), centre and width (sampled space) and log-space floor; ``power`` the
        ``1/S`` each shard's prior of it is raised to (``attrs["power"]`` the least).
    start : xarray.Dataset
        Start values, and the values of the fixed parameters (``params`` layout).
    settings : xarray.Dataset
        ``vary``, ``min``, ``max`` of every parameter as fitted.
    info : dict
        Shards, chains, warmup, samples, seed, chain method, executor, pair counts,
        prior and likelihood choices, wall time, versions.
    """

    posterior: object
    diagnostics: xr.Dataset
    prior: xr.Dataset
    start: xr.Dataset
    settings: xr.Dataset
    info: dict = field(default_factory=dict)

    @property
    def data(self) -> xr.Dataset:
        """The fitted Dataset."""
        return self.posterior.observed_data

    @property
    def params(self) -> xr.Dataset:
        """Posterior means, fixed parameters at their values (``NLSQResult.params``
        layout)."""
        return self._layout(self.posterior.posterior.mean(("chain", "draw")), fixed=True)

    @property
    def stderr(self) -> xr.Dataset:
        """Posterior standard deviations (NaN for fixed parameters)."""
        draws = self.posterior.posterior
        return self._layout(draws.std(("chain", "draw"), ddof=1), fixed=False)

    def _layout(self, stat: xr.Dataset, *, fixed: bool) -> xr.Dataset:
        start = self.start

        def pick(name):
            if name in stat:
                return stat[name].values
            return start[name].values if fixed else np.full(start[name].shape, np.nan)

        physics = np.array([float(pick(n)) for n in PHYSICS_NAMES])
        out = params_layout(
            physics, pick("contrast"), pick("offset"), start["phi"].values, float(start["q"])
        )
        if "noise" in stat:
            out["noise"] = ("phi", stat["noise"].values, {"units": ""})
        return out

    def hdi(self, prob: float = 0.94) -> xr.Dataset:
        """Highest-density interval of each sampled quantity, along ``hdi`` = (lower,
        higher)."""
        return diagnostics.hdi(self.posterior.posterior, prob)

    @property
    def converged(self) -> bool:
        """True when every shard passes every diagnostic threshold."""
        return not diagnostics.failures(self.diagnostics)

    def failures(self) -> dict[int, list[str]]:
        """The failed diagnostic figures by shard (empty when converged)."""
        return diagnostics.failures(self.diagnostics)

    def warnings(self) -> list[str]:
        """Everything the user should know before trusting the numbers."""
        out = [
            f"shard {s} failed its diagnostics: {line} (result.failures() lists every "
            "figure); it is combined with the others, so the combined posterior is not to be "
            "trusted: rerun with more warmup/samples or better start values "
            "(init=hd.fit_nlsq(...))"
            for s, line in diagnostics.brief(self.diagnostics).items()
        ]
        floors = self.prior["floor"]
        if np.any(np.isfinite(floors.values)):
            lower = self.hdi().sel(hdi="lower")
            index = index_of(floors)
            for (name, phi), floor in zip(index, floors.values, strict=True):
                if (
                    np.isfinite(floor)
                    and name in lower
                    and at_entries(lower, entries([name], [phi]))[0] < FLOOR_NOTE * floor
                ):
                    out.append(
                        f"{entry_label(name, phi)}'s posterior reaches its log-space floor "
                        f"{floor:.3g} "
                        f"{UNITS.get(name, '')}: the data are consistent with {name} = 0; "
                        f"fix {name} = 0 if that is the physics"
                    )
        out += [
            f"{label}'s posterior is prior-dominated: its sd in the sampled space is "
            f"{ratio:.0%} of the prior's, so the data hardly constrain it and its interval "
            "is the prior's choice; fix it, or add data that constrain it"
            for label, ratio in self.prior_dominated().items()
        ]
        out += identifiability_warnings(self.parameters())
        physics = [self.value(n) for n in PHYSICS_NAMES]
        out += verdict.mirror_flow(physics, self.params["phi"].values, self.settings)
        if self.info.get("errors", "nominal") == "nominal":
            out.append(
                "the likelihood treats the pairs as independent; two-time pairs share frames, "
                "so on real data the posterior is narrower than the truth warrants "
                '(fit_cmc(..., errors="speckle") corrects it)'
            )
        return out

    def prior_dominated(self) -> dict[str, float]:
        """Sampled quantities whose posterior sd, in the sampled space (log or linear, as
        ``prior["space"]``), exceeds ``PRIOR_DOMINATED`` times the prior's sd: label ->
        ratio. The prior's sd is its ``scale`` (a truncated normal's is at most that) and
        at most ``(high - low) / sqrt(12)``, that of a uniform prior on its bounds."""
        prior, draws = self.prior, self.posterior.posterior
        out = {}
        for k, (name, phi) in enumerate(index_of(prior)):
            if name not in draws:
                continue
            values = draws[name]
            if "phi" in values.dims:
                values = values.isel(phi=0) if np.isnan(phi) else values.sel(phi=phi)
            log = str(prior["space"].values[k]) == "log"
            bounds = np.array([prior["low"].values[k], prior["high"].values[k]], dtype=float)
            with np.errstate(divide="ignore"):
                sampled = np.log(values.values) if log else values.values
                bounds = np.log(bounds) if log else bounds
            spread = (bounds[1] - bounds[0]) / np.sqrt(12.0)
            if str(prior["kind"].values[k]) != "uniform":
                spread = min(spread, float(prior["scale"].values[k]))
            ratio = float(np.std(sampled)) / spread if spread > 0 else 0.0
            if np.isfinite(ratio) and ratio > PRIOR_DOMINATED:
                out[entry_label(name, phi)] = ratio
        return out

    def _extended(self) -> str:
        """`` (run longer than the N asked: ...)`` when fit_cmc extended the chains."""
        asked = int(self.info.get("samples_asked", self.info["samples"]))
        if asked == int(self.info["samples"]):
            return ""
        return f" (extended from the {asked} asked: the ESS fell short)"

    def _rows(self):
        """``(label, mean, sd, hdi lower, hdi higher, worst R-hat, least ESS bulk, least
        ESS tail, unit)`` for every sampled quantity."""
        hdi, figures = self.hdi(), self.diagnostics
        index = index_of(figures)
        columns = [
            at_entries(ds, index)
            for ds in (self.params, self.stderr, hdi.sel(hdi="lower"), hdi.sel(hdi="higher"))
        ]
        worst = (
            figures["rhat"].max("shard").values,
            figures["ess_bulk"].min("shard").values,
            figures["ess_tail"].min("shard").values,
        )
        for k, (name, phi) in enumerate(index):
            yield (
                entry_label(name, phi),
                *(float(c[k]) for c in columns),
                *(float(w[k]) for w in worst),
                UNITS.get(name, ""),
            )

    def _verdict(self) -> str:
        failed = self.failures()
        d = self.diagnostics.attrs
        limits = (
            f"R-hat < {d['threshold_rhat_max']:g}, ESS >= {d['threshold_ess_per_chain_min']:g}"
            f"/chain, BFMI >= {d['threshold_bfmi_min']:g}, divergences <= "
            f"{100 * d['threshold_divergence_max']:g} %"
        )
        if not failed:
            return f"converged: all {self.info['shards']} shards pass {limits}"
        return (
            f"NOT converged: shard(s) {', '.join(map(str, failed))} of {self.info['shards']} "
            f"fail {limits}"
        )

    def _errors_line(self) -> str:
        if self.info.get("errors", "nominal") == "nominal":
            return "nominal: pairs taken as independent"
        return (
            "speckle: draws corrected to the speckle covariance of the pairs "
            f"(kappa {self.info['speckle_kappa']:.3g}, shot "
            f"{self.info.get('shot_kappa', 0.0):.3g}, white variance "
            f"{self.info['white_variance']:.3g}); uncorrected draws in "
            "posterior.uncorrected_posterior"
        )

    def tempering(self) -> str:
        """The power of the shards' priors, in words."""
        power = self.prior.attrs["power"]
        most = float(self.prior["power"].max()) if "power" in self.prior else power
        if most == power:
            return f"tempered to the power {power:.4g} per shard"
        return (
            f"tempered to the power {power:.4g} (physics, over all q-bins' shards) and "
            f"{most:.4g} (this q-bin's own quantities) per shard"
        )

    def report(self) -> str:
        """Text report: settings, per-parameter mean, sd, 94 % HDI, R-hat and ESS, the
        per-shard figures, the verdict and the warnings."""
        info = self.info
        likelihood = (
            "Gaussian on the NLSQ residuals, sigma from the data"
            if info["weighted"]
            else "Gaussian on the NLSQ residuals, noise level per angle sampled"
        )
        prior = (
            f"NLSQ-centred truncated normal, {info['prior_width']:g} x stderr wide"
            if info["prior"] == "nlsq"
            else "uniform on the parameter table's bounds"
        )
        spaces = list(zip(index_of(self.prior), self.prior["space"].values, strict=True))
        logs = [entry_label(name, phi) for (name, phi), s in spaces if s == "log"]
        reflected = [entry_label(name, phi) for (name, phi), s in spaces if s == "reflected"]
        lines = [
            "[[CMC fit]]",
            "    method            consensus Monte Carlo: NUTS (numpyro) per shard, "
            f"{info['combination']}",
            f"    shards            {info['shards']} ({info['shards_rule']}); {info['n_pairs']} "
            f"pairs; {info['shard_size']} entries evaluated per shard "
            f"({_LIKELIHOOD_WORDS[info.get('likelihood', 'pairs')]}, padded)",
            f"    masked            {info.get('nan_pairs', 0)} non-finite pairs; dropped frames: "
            f"{info.get('dropped_frames', 0)}",
            f"    times             {time_origin(self.data)}",
            f"    chains            {info['chains']} per shard ({info['chain_method']}, "
            f"{info['devices']} device), {info['warmup']} warmup + {info['samples']} draws"
            f"{self._extended()}; "
            f"mass matrix {info.get('mass_matrix', 'dense, adapted')}",
            f"    executor          {info['executor']}",
            f"    seed              {info['seed']}",
            f"    scaling           {info['scaling']}",
            f"    likelihood        {likelihood}",
            f"    errors            {self._errors_line()}",
            f"    priors            {prior}; {self.tempering()}",
            f"    log space         {', '.join(logs) or '-'}",
            f"    reflected         {', '.join(reflected) or '-'} (linear, at a bound NLSQ "
            "finds within 3 stderr)",
            f"    wall time         {info['wall_seconds']:.1f} s",
            f"    verdict           {self._verdict()}",
            "[[Parameters]] (mean, sd, 94 % HDI; R-hat worst and ESS least over shards)",
            f"    {'name':<16}{'mean':>13}{'sd':>11}{'hdi 3%':>13}{'hdi 97%':>13}"
            f"{'R-hat':>8}{'ESS bulk':>10}{'ESS tail':>10}  unit",
        ]
        for label, mean, sd, lo, hi, rhat, bulk, tail, unit in self._rows():
            lines.append(
                f"    {label:<16}{mean:>13.6g}{sd:>11.4g}{lo:>13.6g}{hi:>13.6g}"
                f"{rhat:>8.4f}{bulk:>10.0f}{tail:>10.0f}  {unit}"
            )
        lines.append("[[Shards]] (the verdict table; * marks a failed figure)")
        table = diagnostics.verdict(self.diagnostics)
        judged = [column for column, _, _ in diagnostics.VERDICT_FIGURES]
        lines.append(
            f"    {'shard':>5}{'pairs':>9}{'seconds':>9}"
            + "".join(f"{column:>14}" for column in judged)
            + "  verdict"
        )
        formats = {"max R-hat": ".4f", "min BFMI": ".3f", "divergent %": ".3g"}
        for _, row in table.iterrows():
            cells = "".join(
                f"{format(row[c], formats.get(c, '.0f')) + ('' if row[f'{c} ok'] else '*'):>14}"
                for c in judged
            )
            lines.append(
                f"    {int(row['shard']):>5}{int(row['pairs']):>9}{row['seconds']:>9.1f}{cells}"
                f"  {row['verdict']}"
            )
        lines += warning_lines(self.warnings())
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"<CMCResult converged={self.converged} shards={self.info['shards']} "
            f"chains={self.info['chains']} draws={self.info['samples']}>"
        )

    def _repr_html_(self):
        rows = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{mean:.6g}</td><td>{sd:.4g}</td>"
            f"<td>{lo:.6g}</td><td>{hi:.6g}</td><td>{rhat:.4f}</td><td>{bulk:.0f}</td>"
            f"<td>{tail:.0f}</td><td>{html.escape(unit)}</td></tr>"
            for label, mean, sd, lo, hi, rhat, bulk, tail, unit in self._rows()
        )
        warns = "".join(f"<li>{html.escape(w)}</li>" for w in self.warnings())
        return (
            f"<b>CMC fit</b>: {html.escape(self._verdict())}; {self.info['shards']} shards x "
            f"{self.info['chains']} chains x {self.info['samples']} draws, "
            f"{self.info['n_pairs']} pairs<table><tr><th>name</th><th>mean</th><th>sd</th>"
            "<th>hdi 3%</th><th>hdi 97%</th><th>R-hat</th><th>ESS bulk</th>"
            f"<th>ESS tail</th><th>unit</th></tr>{rows}</table>"
            + (f"<ul>{warns}</ul>" if warns else "")
        )

    def plot(self):
        """Posterior views (:func:`heterodyne.plot.posterior`)."""
        from heterodyne import plot

        return plot.posterior(self)

    def to_netcdf(self, path, *, overwrite: bool = False):
        """Write the whole result to one netCDF-4 file (the InferenceData groups and the
        diagnostics, prior, start and settings as groups); ``hd.open_result`` reads it
        back."""
        return write_result("CMCResult", self.info, self.groups(), path, overwrite=overwrite)

    def groups(self) -> dict[str, xr.Dataset]:
        """The Datasets that :meth:`to_netcdf` writes, by group name."""
        present = diagnostics.groups(self.posterior)
        return {
            **{
                g: self.posterior[g]
                for g in CMC_POSTERIOR_GROUPS + CMC_OPTIONAL_GROUPS
                if g in present
            },
            **{name: getattr(self, name) for name in CMC_GROUPS},
        }

    @classmethod
    def _from_tree(cls, tree):
        group, info = read_groups(tree)
        return cls(
            posterior=diagnostics.inference_data(
                **{g: group[g] for g in CMC_POSTERIOR_GROUPS + CMC_OPTIONAL_GROUPS if g in group}
            ),
            **{name: group[name] for name in CMC_GROUPS},
            info=info,
        )


RESULT_TYPES["CMCResult"] = CMCResult
