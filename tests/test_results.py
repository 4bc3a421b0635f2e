"""What both result types share: reading a quantity by name and angle, the stacked
``(name, phi)`` covariance, and result files (this layout's and the previous one's)."""

import numpy as np
import pytest
import xarray as xr

import heterodyne as hd


@pytest.fixture(scope="module")
def fit(tiny_ds):
    return hd.fit_nlsq(tiny_ds, progress=False)


def test_a_per_angle_quantity_is_read_by_its_angle(fit):
    contrast = fit.params["contrast"]
    assert contrast.dims == ("phi",)
    assert fit.value("contrast", phi=45.0) == float(contrast.sel(phi=45.0))
    assert fit.error("offset", phi=0.0) == float(fit.stderr["offset"].sel(phi=0.0))
    with pytest.raises(hd.OptionError, match="one value per angle: give phi, one of 0, 45"):
        fit.value("contrast")
    with pytest.raises(hd.OptionError, match="not an angle of this result"):
        fit.value("contrast", phi=30.0)
    with pytest.raises(hd.OptionError, match="no quantity 'contrast\\[1\\]'"):
        fit.value("contrast[1]")


def test_the_covariance_is_stacked_over_name_and_phi(fit):
    cov = fit.covariance
    assert cov.dims == ("entry", "entry_")
    names, phis = cov["name"].values, cov["phi"].values
    # physics entries have no angle; contrast and offset one entry per angle
    assert np.all(np.isnan(phis[names == "v0"]))
    np.testing.assert_array_equal(phis[names == "contrast"], [0.0, 45.0])
    # its diagonal is the square of stderr, entry by entry
    by_angle = cov.set_xindex(["name", "phi"]).sel(name="contrast")
    np.testing.assert_allclose(
        np.sqrt(np.diag(by_angle.sel(entry_=names == "contrast").values)),
        fit.stderr["contrast"].sel(phi=by_angle["phi"].values).values,
        rtol=1e-15,
    )


def test_a_result_file_of_the_previous_layout_is_refused_with_a_way_to_its_data(
    fit, tiny_ds, tmp_path
):
    """The previous version stored the varied quantities by label (``contrast[1]``) in
    the covariance and the multistart outcomes, and had no ``format`` attribute."""
    labels = [str(n) if np.isnan(p) else f"{n}[{[0.0, 45.0].index(p)}]" for n, p in zip(
        fit.covariance["name"].values, fit.covariance["phi"].values, strict=True
    )]  # fmt: skip
    covariance = xr.DataArray(
        fit.covariance.values,
        dims=("name", "name_"),
        coords={"name": labels, "name_": labels},
        name="covariance",
    )
    starts = fit.starts.drop_vars(["name", "phi"]).rename(entry="name")
    tree = xr.DataTree.from_dict(
        {
            "/": xr.Dataset(attrs={"result_type": "NLSQResult", **fit.info}),
            "/params": fit.params,
            "/stderr": fit.stderr,
            "/stderr_nominal": fit.stderr_nominal,
            "/covariance": covariance.to_dataset(),
            "/starts": starts.assign_coords(name=labels),
            "/model": fit.model,
            "/residuals": fit.residuals.to_dataset(),
            "/data": fit.data,
            "/settings": fit.settings,
        }
    )
    path = tmp_path / "old.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    with pytest.raises(hd.FileFormatError, match="earlier heterodyne.*Fit the data again"):
        hd.open_result(path)
    # the message's recipe gives the data back
    assert xr.open_dataset(path, group="data", engine="h5netcdf").load().identical(tiny_ds)


def test_a_result_file_round_trips_with_its_stacked_index(fit, tmp_path):
    back = hd.open_result(fit.to_netcdf(tmp_path / "fit.nc"))
    assert back.covariance.identical(fit.covariance)
    assert back.starts.identical(fit.starts)
    assert back.params.identical(fit.params) and back.info == fit.info
