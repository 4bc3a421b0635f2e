"""The package's judgement of a least-squares fit: ``ok``, ``check`` or ``fail``, with reasons.

``result.success`` keeps scipy's meaning (the optimiser stopped by a convergence test);
the verdict says whether the numbers can be trusted. Each rule names what it detects:

=========================  =====================================================  ======
rule                       detects                                                status
=========================  =====================================================  ======
not converged              the optimiser stopped for another reason               fail
symmetry plane             equal rates and ``x_s = 1/2`` (to 2 % or within 2      fail
                           stderr): the exchange saddle
aliased velocity           a phase step ``q |cos(phi - phi0)| (V_j+1 - V_j)``      fail
                           above ``pi`` per frame: a faster flow that looks slow
mirror flow                two angles see ``v |cos(phi - phi0)|`` only: another    check
                           ``(v0, phi0)`` within the bounds fits exactly as well
labels                     the reference faster than the sample after the fit     check
                           (the exchange could not be mapped back)
equal rates                both components decay alike: labels are arbitrary      check
at a bound                 a varied quantity on a bound (a rate at 0 is a static  check
                           component, ``phi0`` is periodic: neither counts)
distinct minima            starts that end in different solutions with ``chi2``   check
                           within :data:`NEAR_CHI2` (in units of the noise)
degenerate group           varied quantities correlated beyond 0.99: one line     check
                           per connected group
residual structure         the mean residual along each lag explains more than    check
                           :data:`STRUCTURE_MAX` of the residual sum of squares
sigma too small            with ``sigma``: reduced ``chi2`` above                 check
                           :data:`REDUCED_CHI2_MAX`
=========================  =====================================================  ======
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heterodyne import starts
from heterodyne.parameters import FRACTION_NAMES, PHYSICS_INDEX, PHYSICS_NAMES
from heterodyne.results import AT_BOUND_RTOL, entry_label, index_of

STATUSES = ("ok", "check", "fail")
DEGENERATE = 0.99  # MODEL.md: report quantities more correlated than this, as groups
NEAR_CHI2 = 10.0  # minima closer than this in chi2 / (residual variance) are "as good"
STRUCTURE_MAX = 0.3  # share of the residual sum of squares explained by lag means
REDUCED_CHI2_MAX = 2.0
EQUAL_RATES = 0.02  # relative difference of the transport integrals called "equal"
HALF = 0.02  # |x_s - 1/2| called "one half"
MIRROR_DEG = 1.0  # a mirror flow closer than this [deg] (and 1/90 in speed) is the fit
PHYSICAL_ZERO = ("D0_ref", "D0_sample")  # at a lower bound of 0: a static component


@dataclass(frozen=True)
class Verdict:
    """``status`` (``"ok"``, ``"check"`` or ``"fail"``) and the reasons behind it;
    ``notes`` tell what the fit did that the user should know (a relabelling)."""

    status: str
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [self.status.upper() + ("" if self.reasons else ": no problem found")]
        lines += [f"- {r}" for r in self.reasons]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines)


def of_fit(result) -> Verdict:
    """The verdict on an :class:`~heterodyne.nlsq_result.NLSQResult` (the rules above)."""
    fail, check, notes = [], [], []
    info = result.info
    physics = np.array([float(result.params[n]) for n in PHYSICS_NAMES])
    t = result.data["t1"].values
    if not result.success:
        fail.append(f"the optimiser did not converge: {result.message}")
    fail += _aliasing(physics, result.data)
    if not info.get("joint"):  # a joint fit's bins share its angles: JointResult says it
        check += mirror_flow(physics, result.data["phi"].values, result.settings)
    ref, sample = starts.transport(physics, t)
    fraction = starts.fraction(t, *_fraction_law(physics))
    equal = abs(ref - sample) <= EQUAL_RATES * (ref + sample) or _within_errors(
        result, "D0_ref", "D0_sample", 0.0
    )
    half = abs(float(fraction.mean()) - 0.5) <= HALF or _within_errors(result, "f0", None, 0.5)
    if equal and half:
        fail.append(
            "the fit sits on the exchange symmetry plane (equal rates, x_s = 1/2), a saddle "
            "where the gradient along every exchange direction is zero: refit from other "
            "starts (multistart) or give start values"
        )
    elif equal:
        check.append(
            "the two components have the same transport over the window: which one is the "
            "reference is arbitrary"
        )
    exchanged = info.get("exchanged", "")
    if exchanged == "exact":
        notes.append(
            "the fit ended with the components exchanged; it is reported relabelled "
            "(reference = slower component, x_s -> 1 - x_s), at the same cost"
        )
    elif exchanged == "refit":
        notes.append(
            "the fit ended with the components exchanged; it was refitted from the "
            "relabelled point (reference = slower component)"
        )
    elif exchanged == "failed" or ref > sample * (1 + EQUAL_RATES):
        check.append(
            "the reference decays faster than the sample, against the convention "
            "(reference = slower component), and could not be relabelled: the fraction "
            "law cannot express 1 - x_s here"
        )
    index = index_of(result.covariance)
    check += [
        f"{entry_label(name, phi)} is at a bound: its value is limited by the bound, not the data"
        for (name, phi), bound in zip(index, result.bound_mask(), strict=True)
        if bound and _counts_at_bound(result, name)
    ]
    check += _distinct_minima(result)
    for group in _components(result):
        labels = [entry_label(*index[k]) for k in group]
        line = (
            f"{', '.join(labels)} are degenerate (|correlation| > {DEGENERATE}): only a "
            "combination is determined"
        )
        if any(index[k][0] in PHYSICS_NAMES for k in group):
            check.append(line + "; fix all but one or give more data")
        else:  # contrast and offset alone: the physics are not affected
            notes.append(line + " (the physics parameters are not affected)")
    structure = residual_structure(result)
    if structure > STRUCTURE_MAX:
        check.append(
            f"the residuals have structure along the lag ({100 * structure:.0f} % of their "
            "sum of squares is a smooth function of lag): the model misses a feature of the "
            "data, or the fit is in a local minimum (try multistart)"
        )
    if info.get("weighted") and result.reduced_chi2 > REDUCED_CHI2_MAX:
        check.append(
            f"reduced chi2 is {result.reduced_chi2:.3g} with the stated sigma: the residuals "
            "are larger than the uncertainties allow"
        )
    status = "fail" if fail else "check" if check else "ok"
    return Verdict(status, tuple(fail + check), tuple(notes))


def _within_errors(result, a: str, b: str | None, target: float) -> bool:
    """Whether ``a - b`` (or ``a`` alone) is within 2 standard errors of ``target``, by
    the fit's covariance; False when a quantity is not varied."""
    names = [str(n) for n in result.covariance["name"].values]  # a and b are physics: unique
    if a not in names or (b is not None and b not in names):
        return False
    weights = np.zeros(len(names))
    weights[names.index(a)] = 1.0
    value = result.value(a) - target
    if b is not None:
        weights[names.index(b)] = -1.0
        value -= result.value(b)
    variance = float(weights @ result.covariance.values @ weights)
    return variance > 0 and abs(value) < 2.0 * np.sqrt(variance)


def _aliasing(physics: np.ndarray, ds) -> list[str]:
    """The aliased-velocity rule: the largest phase step per frame over the window."""
    frames = starts.integrals(physics, ds["t1"].values)
    step = np.abs(np.diff(frames.V))
    q = float(ds["q"])
    cosine = np.abs(np.cos(np.deg2rad(ds["phi"].values - physics[PHYSICS_INDEX["phi0"]])))
    phase = q * float(cosine.max()) * float(step.max(initial=0.0))
    if phase <= np.pi:
        return []
    return [
        f"the velocity is aliased: its phase changes by {phase / np.pi:.3g} pi per frame, "
        f"more than the pi the frame rate resolves (|v| <= {starts.resolvable_velocity(ds):.4g} "
        "Å/s here); a slower velocity fits the same frames: bound v0 and refit"
    ]


def flow_mirror(physics, phi, settings) -> np.ndarray | None:
    """The physics of the other flow that fits two angles exactly as well, or None.

    Only ``|cos(phi_k - phi0)| V`` enters the model (the cross term is even in its
    phase), so with two distinct angles (mod 180 deg) the flow ``(s v, phi0')`` with
    ``s cos(phi_k - phi0') = ±cos(phi_k - phi0)``, the signs opposite at the two angles,
    fits exactly as well: ``A cos(phi_k) + B sin(phi_k) = (cos(phi_1 - phi0),
    -cos(phi_2 - phi0))_k``, ``s = hypot(A, B)``, ``phi0' = atan2(B, A)``; ``v0`` and
    ``v_offset`` both scale by ``s``. None when the angles are not two, when the fit
    could not move there (``phi0`` fixed, a non-zero velocity term fixed, the mirror
    outside the bounds) or when it coincides with the fit."""
    angles = np.unique(np.round(np.mod(np.asarray(phi, float), 180.0), 9))
    physics = np.asarray(physics, float)
    vary = settings["vary"]
    velocity = [PHYSICS_INDEX[n] for n in ("v0", "v_offset")]
    if angles.size != 2 or not bool(vary.sel(name="phi0")):
        return None
    if not np.any(physics[velocity]) or any(
        physics[k] and not bool(vary.sel(name=PHYSICS_NAMES[k])) for k in velocity
    ):
        return None
    phi0 = physics[PHYSICS_INDEX["phi0"]]
    rad = np.deg2rad(angles)
    seen = np.cos(rad - np.deg2rad(phi0))
    a, b = np.linalg.solve(np.column_stack([np.cos(rad), np.sin(rad)]), seen * [1.0, -1.0])
    scale = float(np.hypot(a, b))
    mirror = physics.copy()
    mirror[velocity] *= scale
    mirror[PHYSICS_INDEX["phi0"]] = (np.rad2deg(np.arctan2(b, a)) + 90.0) % 180.0 - 90.0
    turn = abs((mirror[PHYSICS_INDEX["phi0"]] - phi0 + 90.0) % 180.0 - 90.0)
    if turn < MIRROR_DEG and abs(scale - 1.0) < MIRROR_DEG / 90.0:
        return None
    lo, hi = (settings[k].values for k in ("min", "max"))
    names = list(settings["name"].values)
    inside = all(
        lo[names.index(PHYSICS_NAMES[k])] <= mirror[k] <= hi[names.index(PHYSICS_NAMES[k])]
        for k in velocity
    )
    return mirror if inside else None


def mirror_flow(physics, phi, settings) -> list[str]:
    """The mirror-flow rule (:func:`flow_mirror`) as a verdict line."""
    mirror = flow_mirror(physics, phi, settings)
    if mirror is None:
        return []
    angles = ", ".join(f"{v:g}" for v in np.unique(np.asarray(phi, float)))
    v0, phi0 = mirror[PHYSICS_INDEX["v0"]], mirror[PHYSICS_INDEX["phi0"]]
    return [
        f"two angles ({angles} deg) see the flow only as v |cos(phi - phi0)|: v0 = {v0:.4g} "
        f"Å/s{'' if not mirror[PHYSICS_INDEX['v_offset']] else ' (v_offset scaled alike)'} "
        f"with phi0 = {phi0:.3g} deg fits the data exactly as well as this solution; the "
        "flow direction needs a third angle, or phi0 (or v0) fixed from other knowledge"
    ]


def _counts_at_bound(result, name: str) -> bool:
    if name == "phi0":  # periodic: -90 and 90 are one direction
        return False
    if name not in PHYSICAL_ZERO:
        return True
    lo, hi = (float(result.settings[k].sel(name=name)) for k in ("min", "max"))
    return not (lo == 0.0 and float(result.params[name]) - lo <= AT_BOUND_RTOL * (hi - lo))


def degenerate_groups(result) -> list[list[str]]:
    """The groups of :func:`_components` by their display labels."""
    index = index_of(result.covariance)
    return [[entry_label(*index[k]) for k in group] for group in _components(result)]


def _components(result) -> list[list[int]]:
    """Groups of varied quantities linked by ``|correlation| > DEGENERATE`` (connected
    components of that graph), largest first."""
    corr = np.nan_to_num(result.correlation.values)
    linked = np.abs(corr) > DEGENERATE
    np.fill_diagonal(linked, False)
    seen, groups = set(), []
    for start in range(len(linked)):
        if start in seen or not linked[start].any():
            continue
        stack, group = [start], []
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            group.append(k)
            stack += list(np.flatnonzero(linked[k]))
        groups.append(sorted(group))
    return sorted(groups, key=len, reverse=True)


def residual_structure(result) -> float:
    """The share of the residual sum of squares carried by the mean residual at each
    lag and angle: ``sum_l n_l m_l² / sum r²``. Independent noise gives about
    ``lags / pairs``; a model that misses a feature of the data, most of 1."""
    r = result.residuals.values
    total, smooth = 0.0, 0.0
    for matrix in r:
        for lag in range(1, matrix.shape[-1]):
            d = np.diagonal(matrix, offset=lag)
            d = d[np.isfinite(d)]
            if d.size:
                total += float(d @ d)
                smooth += float(d.sum()) ** 2 / d.size
    return smooth / total if total > 0 else 0.0


def _distinct_minima(result) -> list[str]:
    """Starts whose cost is within ``NEAR_CHI2`` of the best but whose physics differ."""
    tried = result.starts
    cost = tried["cost"].values
    if cost.size < 2:
        return []
    dof = max(result.info["n_pairs"] - result.info["n_varied"], 1)
    variance = 1.0 if result.info.get("weighted") else 2 * float(np.min(cost)) / dof
    best = int(np.argmin(cost))
    names = [str(n) for n in tried["name"].values]
    physics = [k for k, n in enumerate(names) if n in PHYSICS_NAMES]
    if not physics or variance <= 0:
        return []
    out = []
    x = tried["x"].values
    t = result.data["t1"].values
    reference = _invariants(result, x[best], names, t)
    for k in range(cost.size):
        if k == best or not np.isfinite(cost[k]):
            continue
        if 2 * (cost[k] - cost[best]) / variance > NEAR_CHI2:
            continue
        if _differ(reference, _invariants(result, x[k], names, t), float(result.data["q"])):
            out.append(
                f"start {k} ended in a different solution with a chi2 as good as the best "
                f"(difference {2 * (cost[k] - cost[best]) / variance:.2g} in units of the "
                "noise): the data do not single out one minimum"
            )
    return out[:1]


def _invariants(result, x, names, t):
    """Quantities that the exchange of components leaves unchanged: the two transport
    integrals in increasing order, v0, phi0 and the slower component's mean fraction."""
    physics = np.array([float(result.params[n]) for n in PHYSICS_NAMES])
    for k, n in enumerate(names):
        if n in PHYSICS_NAMES:
            physics[PHYSICS_INDEX[n]] = x[k]
    ref, sample = starts.transport(physics, t)
    fraction = float(np.mean(starts.fraction(t, *_fraction_law(physics))))
    slow = 1.0 - fraction if ref <= sample else fraction
    v0, phi0 = physics[PHYSICS_INDEX["v0"]], physics[PHYSICS_INDEX["phi0"]]
    return np.array([min(ref, sample), max(ref, sample), v0, phi0, slow])


def _fraction_law(physics) -> list[float]:
    """The arguments ``f0 .. f3`` of :func:`heterodyne.model.sample_fraction`."""
    return [physics[PHYSICS_INDEX[n]] for n in FRACTION_NAMES]


def _differ(a, b, q) -> bool:
    """Whether two solutions' invariants differ: decays over the window by more than 10 %
    and 0.1 in ``q² A``, v0 by 5 %, phi0 by 5 deg (with flow), the fraction by 0.05."""
    change = np.abs(a[:2] - b[:2])
    rates = (change > 0.1 * np.maximum(np.abs(a[:2]), np.abs(b[:2]))) & (q * q * change > 0.1)
    velocity = abs(a[2] - b[2]) > 0.05 * max(abs(a[2]), abs(b[2])) + 1e-9
    angle = abs((a[3] - b[3] + 90) % 180 - 90) > 5.0 and max(a[2], b[2]) > 0
    return bool(rates.any() or velocity or angle or abs(a[4] - b[4]) > 0.05)
