import jax

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ds():
    """20 frames x 2 angles of simulated data: small enough that a fit takes a moment."""
    import heterodyne as hd

    truth = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}
    return hd.simulate(truth, n_frames=20, phi=[0.0, 45.0], noise=0.01, seed=1)


@pytest.fixture(scope="module")
def tiny_file(tiny_ds, tmp_path_factory):
    """``tiny_ds`` saved as netCDF."""
    import heterodyne as hd

    return hd.to_netcdf(tiny_ds, tmp_path_factory.mktemp("tiny") / "tiny.nc")
