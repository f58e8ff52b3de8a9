"""Change of variables in 1D, the tutorial's starting point.

``x ~ Uniform(0, 1)`` is pushed through the affine map ``y = f(x) = a·x + b``. The density of
``y`` follows from the change-of-variables formula

    p_y(y) = p_x(f⁻¹(y)) · |d f⁻¹(y) / dy|  =  1/|a|   on the image of [0, 1],

which we evaluate with ``jax.grad`` for the derivative, and compare with a histogram of
samples. Run ``python examples/change_of_variables_1d.py [OUT.png]`` to draw the picture.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np


def densities(key, n: int = 200_000, a: float = 2.0, b: float = -1.0, bins: int = 40):
    """Histogram density of ``y = a·x + b`` samples and the change-of-variables density.

    Returns ``(bin_centers, histogram_density, formula_density)``.
    """
    f = lambda x: a * x + b
    f_inv = lambda y: (y - b) / a
    p_x = lambda x: jnp.where((x >= 0) & (x <= 1), 1.0, 0.0)
    df_inv = jax.vmap(jax.grad(f_inv))

    y = f(jax.random.uniform(key, (n,)))
    lo, hi = sorted((f(0.0), f(1.0)))
    hist, edges = np.histogram(np.asarray(y), bins=bins, range=(lo, hi), density=True)
    centers = 0.5 * (edges[1:] + edges[:-1])
    formula = p_x(f_inv(jnp.asarray(centers))) * jnp.abs(df_inv(jnp.asarray(centers)))
    return centers, hist, np.asarray(formula)


def main(out: str = "change_of_variables_1d.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers, hist, formula = densities(jax.random.key(0))
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    width = centers[1] - centers[0]
    ax.bar(centers, hist, width=width, alpha=0.5, label="histogram of y = 2x − 1")
    ax.plot(centers, formula, "r-", lw=2, label=r"$p_x(f^{-1}(y))\,|df^{-1}/dy|$")
    ax.set_xlabel("y")
    ax.set_ylabel("density")
    ax.set_ylim(0, 1.2 * max(hist.max(), formula.max()))
    ax.legend(fontsize=8, loc="lower center")
    ax.set_title("x ~ U(0, 1), y = 2x − 1")
    fig.savefig(out, dpi=110)
    print(f"max |histogram − formula| = {np.max(np.abs(hist - formula)):.4f}; wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
