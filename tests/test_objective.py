"""The public objective drives a user's own optimiser to the optimum of ``fit_nlsq``."""

import numpy as np
import pytest
from scipy.optimize import minimize

import heterodyne as hd


def test_scipy_minimize_on_cost_and_gradient_reaches_the_nlsq_optimum(tiny_ds):
    fit = hd.fit_nlsq(tiny_ds, progress=False)
    objective = hd.Objective.build(tiny_ds)
    # a generic optimiser needs the decades between D0 (~1e4) and f0 (~0.5) scaled away
    scale = np.where(objective.x0 != 0, np.abs(objective.x0), 1.0)
    found = minimize(
        lambda u: objective.cost(u * scale),
        objective.x0 / scale,
        jac=lambda u: objective.gradient(u * scale) * scale,
        method="L-BFGS-B",
        bounds=list(zip(objective.lower / scale, objective.upper / scale, strict=True)),
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000},
    )
    x = found.x * scale
    assert objective.cost(x) == pytest.approx(fit.chi2 / 2, rel=1e-6)
    found = objective.values(x)
    np.testing.assert_array_equal(objective.from_values(found), x)
    fitted, error = objective.from_values(fit.params), objective.from_values(fit.stderr)
    assert np.all(np.abs(x - fitted) < 0.01 * error), objective.labels
    for name in ("contrast", "offset"):  # per angle, along phi
        assert found[name].dims == ("phi",)
        np.testing.assert_allclose(
            found[name], fit.params[name], atol=0.01 * fit.stderr[name].max()
        )


def test_gradient_is_the_jacobian_times_the_residuals(tiny_ds):
    objective = hd.Objective.build(tiny_ds)
    x = objective.x0 * 1.01
    _, jtr, rtr = objective.normal_equations(x)
    np.testing.assert_allclose(
        objective.gradient(x), jtr, rtol=1e-9, atol=1e-12 * np.abs(jtr).max()
    )
    assert objective.cost(x) == pytest.approx(0.5 * rtr, rel=1e-12)
