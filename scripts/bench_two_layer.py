"""Times the two-layer seed net: jaxnets (one net, 10,000 nets) against numpy, in one process.

Run: python scripts/bench_two_layer.py [--nets 10000] [--numpy-iterations 150]
The numpy einsum baselines run --numpy-iterations steps and are scaled to 1500 (the cost per
step is constant), so the whole run stays short on a shared machine.
"""

import argparse
import time

import jax
import numpy as np

from experiments import two_layer_sigmoid as exp
from jaxnets.models.mlp import sum_squared_error, two_layer_train_many


def best_of(fn, repeats=3):
    """(min wall seconds, min CPU seconds) of fn() over `repeats` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def numpy_tutorial(iterations):
    np.random.seed(1)
    w1, w2 = np.random.rand(3, 4), np.random.rand(4, 1)
    x, y = exp.X.astype(np.float64), exp.Y.astype(np.float64)
    for _ in range(iterations):
        l1 = 1 / (1 + np.exp(-(x @ w1)))
        out = 1 / (1 + np.exp(-(l1 @ w2)))
        d = 2 * (y - out) * out * (1 - out)
        w2, w1 = w2 + l1.T @ d, w1 + x.T @ ((d @ w2.T) * l1 * (1 - l1))
    return w1


def numpy_einsum(w1, w2, iterations):
    """Nets on the leading axis: w1 [N, 3, 4], w2 [N, 4, 1]."""
    x, y = exp.X.astype(w1.dtype), exp.Y.astype(w1.dtype)
    for _ in range(iterations):
        l1 = 1 / (1 + np.exp(-np.einsum("sd,ndh->nsh", x, w1)))
        out = 1 / (1 + np.exp(-np.einsum("nsh,nho->nso", l1, w2)))
        d = 2 * (y - out) * out * (1 - out)
        d1 = np.einsum("nso,nho->nsh", d, w2) * l1 * (1 - l1)
        w2 = w2 + np.einsum("nsh,nso->nho", l1, d)
        w1 = w1 + np.einsum("sd,nsh->ndh", x, d1)
    return w1


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nets", type=int, default=10_000)
    parser.add_argument("--numpy-iterations", type=int, default=150)
    args = parser.parse_args()
    its, x, y = 1500, exp.X, exp.Y
    rows = []

    one = jax.tree.map(lambda v: v[0], exp.init_params(exp.Config()))
    train = jax.jit(exp.train_one, static_argnames=("iterations", "check"))
    start = time.perf_counter()
    compiled = train.lower(one, x, y, 1.0, iterations=its, check=False).compile()
    rows.append(("jaxnets one net: compile", time.perf_counter() - start, None))
    rows.append(
        ("jaxnets one net (scan, loss history)", *best_of(lambda: compiled(one, x, y, 1.0)))
    )
    rows.append(("numpy tutorial loop, one net, f64", *best_of(lambda: numpy_tutorial(its))))

    params = exp.init_params(exp.Config(nets=args.nets))
    many = lambda: two_layer_train_many(params, x, y, iterations=its, learning_rate=1.0)
    start = time.perf_counter()
    _, loss = jax.block_until_ready(many())
    rows.append(
        (f"jaxnets {args.nets} nets: compile + first run", time.perf_counter() - start, None)
    )
    rows.append((f"jaxnets {args.nets} nets (two_layer_train_many)", *best_of(many)))

    def vmapped(p):
        def body(_, q):
            g = jax.grad(sum_squared_error)(q, x, y)
            return jax.tree.map(lambda w, gw: w - gw, q, g)

        return jax.lax.fori_loop(0, its, body, p)

    vm = jax.jit(jax.vmap(vmapped))
    jax.block_until_ready(vm(params))
    rows.append((f"jax.vmap(jax.grad loop) {args.nets} nets", *best_of(lambda: vm(params), 1)))

    scale = its / args.numpy_iterations
    for dtype in (np.float32, np.float64):
        w1, w2 = (np.asarray(params[k], dtype) for k in ("w1", "w2"))
        wall, cpu = best_of(lambda w1=w1, w2=w2: numpy_einsum(w1, w2, args.numpy_iterations), 1)
        name = f"numpy einsum {args.nets} nets {np.dtype(dtype).name} (x{scale:g})"
        rows.append((name, wall * scale, cpu * scale))

    print(f"{'what (1500 iterations)':58s} {'wall s':>9s} {'cpu s':>9s}")
    for name, wall, cpu in rows:
        print(f"{name:58s} {wall:9.4f} {'' if cpu is None else f'{cpu:9.4f}'}")
    print(f"nets reaching loss < 0.01: {int((loss < 0.01).sum())} of {args.nets}")


if __name__ == "__main__":
    main()
