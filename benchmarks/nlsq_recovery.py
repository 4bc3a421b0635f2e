"""NLSQ recovery study (issue 3): noise 0.01, 3 angles, N = 200, start 30 % off, 20 seeds.

Prints, per varied quantity, the largest |fit - truth| / stderr over seeds and the ratio
of the mean stderr to the scatter of the fitted values (1 means honest errors).

    .venv/bin/python benchmarks/nlsq_recovery.py [--seeds 20] [--frames 200]
"""

import argparse

import numpy as np

import heterodyne as hd
from heterodyne.results import at_entries, entry_label, index_of

TRUTH = {"D0_ref": 3e3, "D0_sample": 2e4, "v0": 800.0, "f0": 0.4, "phi0": 20.0}


def truth_of(ds, layout):
    """The simulated truth of ``ds`` in the ``params`` layout ``layout``."""
    return layout.copy(
        data={n: np.broadcast_to(ds.attrs[f"true_{n}"], v.shape) for n, v in layout.items()}
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    guess = hd.Parameters({k: 1.3 * v for k, v in TRUTH.items()})
    values, errors, truths = [], [], []
    for seed in range(args.seeds):
        ds = hd.simulate(TRUTH, n_frames=args.frames, phi=[-45, 0, 45], noise=0.01, seed=seed)
        r = hd.fit_nlsq(ds, guess, progress=False)
        index = index_of(r.covariance)
        values.append(at_entries(r.params, index))
        errors.append(at_entries(r.stderr, index))
        truths.append(at_entries(truth_of(ds, r.params), index))
    values, errors, truths = map(np.asarray, (values, errors, truths))
    z = (values - truths) / errors
    ratio = errors.mean(axis=0) / values.std(axis=0, ddof=1)
    print(
        f"{'quantity':<16}{'truth':>11}{'mean fit':>12}{'max |z|':>9}{'rms z':>7}"
        f"{'stderr/scatter':>16}"
    )
    for k, entry in enumerate(index):
        print(
            f"{entry_label(*entry):<16}{truths[0, k]:>11.5g}{values[:, k].mean():>12.5g}"
            f"{np.abs(z[:, k]).max():>9.2f}{np.sqrt(np.mean(z[:, k] ** 2)):>7.2f}"
            f"{ratio[k]:>16.2f}"
        )


if __name__ == "__main__":
    main()
