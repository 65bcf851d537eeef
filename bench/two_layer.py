"""The two-layer sigmoid seed net (SEEDS.md section 1): one net and 10,000 nets, 1500 iterations.

Contenders: jaxnets `two_layer_train_many` (compile reported apart), the tutorial's numpy loop
(one net, float64), and for the many nets the strongest numpy and PyTorch a competent user would
write: the nets on the last, contiguous axis (w1 [d_in, hidden, nets], w2 [hidden, out, nets]),
float32, the two contractions with X (forward and the w1 gradient) as one GEMM over all nets
(x @ w1 with w1 viewed as [d_in, hidden * nets]), the tiny contractions over hidden and out as
broadcast products summed over their axis, in place where numpy allows; PyTorch eager and the same
step under `torch.compile` (Inductor fuses its elementwise work into C++ loops). For reference,
the formulations an earlier README compared against: numpy `einsum` and PyTorch `bmm` over a
leading nets axis. PyTorch runs 1 thread (2 measured far slower on a loaded machine; `--torch-
threads 2` for a quiet one). The numpy and PyTorch batched runs take `--scaled-iterations`
steps and are scaled to 1500 (every step costs the same), to keep the run short.

Run: .venv-bench/bin/python bench/two_layer.py [--nets 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402

ITERATIONS = 1500
X = [[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]]
Y = [[0], [1], [1], [0]]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def numpy_tutorial(np, iterations: int) -> float:
    """The tutorial's loop, one net, float64; returns the final loss."""
    np.random.seed(1)
    w1, w2 = np.random.rand(3, 4), np.random.rand(4, 1)
    x, y = np.array(X, np.float64), np.array(Y, np.float64)
    for _ in range(iterations):
        l1 = 1 / (1 + np.exp(-(x @ w1)))
        out = 1 / (1 + np.exp(-(l1 @ w2)))
        d = 2 * (y - out) * out * (1 - out)
        w2, w1 = w2 + l1.T @ d, w1 + x.T @ ((d @ w2.T) * l1 * (1 - l1))
    out = 1 / (1 + np.exp(-(1 / (1 + np.exp(-(x @ w1))) @ w2)))
    return float(np.sum((y - out) ** 2))


def numpy_einsum(np, w1, w2, iterations: int):
    """Nets on the leading axis: w1 [N, 3, 4], w2 [N, 4, 1]."""
    x, y = np.array(X, w1.dtype), np.array(Y, w1.dtype)
    for _ in range(iterations):
        l1 = 1 / (1 + np.exp(-np.einsum("sd,ndh->nsh", x, w1)))
        out = 1 / (1 + np.exp(-np.einsum("nsh,nho->nso", l1, w2)))
        d = 2 * (y - out) * out * (1 - out)
        d1 = np.einsum("nso,nho->nsh", d, w2) * l1 * (1 - l1)
        w2 = w2 + np.einsum("nsh,nso->nho", l1, d)
        w1 = w1 + np.einsum("sd,nsh->ndh", x, d1)
    return w1, w2


def _nets_last(w1, w2):
    """[N, D, H], [N, H, O] -> the nets-last layout [D, H, N], [H, O, N], contiguous."""
    return w1.transpose(1, 2, 0).copy(), w2.transpose(1, 2, 0).copy()


def numpy_nets_last(np, w1, w2, iterations: int):
    """The strongest numpy formulation: nets last (w1 [D, H, N], w2 [H, O, N]), in place."""
    (d_in, hidden, nets), n_out = w1.shape, w2.shape[1]
    x, y = np.array(X, w1.dtype), np.array(Y, w1.dtype)[:, :, None]
    samples = x.shape[0]
    w1, w2 = w1.reshape(d_in, hidden * nets).copy(), w2.copy()  # X contractions: one GEMM
    h = np.empty((samples, hidden * nets), w1.dtype)
    h3 = h.reshape(samples, hidden, nets)
    g, tmp = np.empty_like(h), np.empty_like(h)
    g3 = g.reshape(samples, hidden, nets)
    out, d, t = (np.empty((samples, n_out, nets), w1.dtype) for _ in range(3))
    gw2 = np.empty_like(w2)
    for _ in range(iterations):
        np.matmul(x, w1, out=h)  # [S, H * N]
        np.negative(h, out=h)
        np.exp(h, out=h)
        h += 1
        np.reciprocal(h, out=h)  # sigmoid
        np.einsum("shn,hon->son", h3, w2, out=out)
        np.negative(out, out=out)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
        np.subtract(y, out, out=d)  # d = 2 (y - out) out (1 - out)
        d *= out
        np.subtract(1, out, out=t)
        d *= t
        d *= 2
        np.einsum("son,hon->shn", d, w2, out=g3)  # (d @ w2.T) * h * (1 - h)
        g *= h
        np.subtract(1, h, out=tmp)
        g *= tmp
        np.einsum("shn,son->hon", h3, d, out=gw2)
        w2 += gw2
        w1 += x.T @ g
    return w1.reshape(d_in, hidden, nets), w2


def _torch_nets_last_step(x, y, w1, w2):
    """One step in the nets-last layout; w1 [D, H * N], w2 [H, O, N]; the update is += dW."""
    hidden, nets = w2.shape[0], w2.shape[2]
    l1 = (x @ w1).sigmoid().view(-1, hidden, nets)  # one GEMM over all nets
    out = (l1[:, :, None] * w2).sum(1).sigmoid()  # [S, O, N]
    d = 2 * (y - out) * out * (1 - out)
    d1 = (d[:, None] * w2).sum(2) * l1 * (1 - l1)  # [S, H, N]
    return w1 + x.T @ d1.view(-1, hidden * nets), w2 + (l1[:, :, None] * d[:, None]).sum(0)


def torch_nets_last(torch, w1, w2, iterations: int, step=_torch_nets_last_step):
    """Nets last, float32; `step` is the eager step or its `torch.compile`."""
    d_in, hidden, nets = w1.shape
    x = torch.tensor(X, dtype=w1.dtype)
    y = torch.tensor(Y, dtype=w1.dtype)[:, :, None]
    w1 = w1.reshape(d_in, hidden * nets)
    with torch.no_grad():
        for _ in range(iterations):
            w1, w2 = step(x, y, w1, w2)
    return w1.view(d_in, hidden, nets), w2


def torch_bmm(torch, w1, w2, iterations: int):
    """Nets on the leading axis with batched matmuls, float32."""
    x = torch.tensor(X, dtype=w1.dtype).expand(w1.shape[0], 4, 3)
    y = torch.tensor(Y, dtype=w1.dtype)
    xt = x.transpose(1, 2)
    with torch.no_grad():
        for _ in range(iterations):
            l1 = torch.sigmoid(torch.bmm(x, w1))
            out = torch.sigmoid(torch.bmm(l1, w2))
            d = 2 * (y - out) * out * (1 - out)
            d1 = torch.bmm(d, w2.transpose(1, 2)) * l1 * (1 - l1)
            w2 = w2 + torch.bmm(l1.transpose(1, 2), d)
            w1 = w1 + torch.bmm(xt, d1)
    return w1, w2


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nets", type=int, default=10_000)
    parser.add_argument("--scaled-iterations", type=int, default=150)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    jax.config.update("jax_num_cpu_devices", 2)  # before JAX starts: one device per core
    from jaxnets.models import two_layer_train_many

    x, y = np.array(X, np.float32), np.array(Y, np.float32)
    draws = np.random.RandomState(1).rand(args.nets, 16)
    w1 = draws[:, :12].reshape(args.nets, 3, 4).astype(np.float32)
    w2 = draws[:, 12:].reshape(args.nets, 4, 1).astype(np.float32)
    many = {"w1": jax.numpy.asarray(w1), "w2": jax.numpy.asarray(w2)}
    one = jax.tree.map(lambda v: v[:1], many)
    train = lambda p: jax.block_until_ready(
        two_layer_train_many(p, x, y, iterations=ITERATIONS, learning_rate=1.0)
    )
    res: dict = {"nets": args.nets, "iterations": ITERATIONS, "jax_version": jax.__version__}
    res["jaxnets_one_compile_s"] = _seconds(lambda: train(one))
    res["jaxnets_one_s"] = min(_seconds(lambda: train(one)) for _ in range(3))
    res["jaxnets_one_loss"] = float(train(one)[1][0])
    res["numpy_one_f64_s"] = min(_seconds(lambda: numpy_tutorial(np, ITERATIONS)) for _ in range(3))
    res["numpy_one_loss"] = numpy_tutorial(np, ITERATIONS)
    res["jaxnets_many_compile_s"] = _seconds(lambda: train(many))
    res["jaxnets_many_s"] = min(_seconds(lambda: train(many)) for _ in range(2))
    devices = jax.devices()[:2]
    if len(devices) == 2 and args.nets % 2 == 0:  # the nets sharded over both cores
        mesh = jax.sharding.Mesh(np.array(devices), ("nets",))
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("nets"))
        split = jax.device_put(many, spec)
        res["jaxnets_many_2dev_compile_s"] = _seconds(lambda: train(split))
        res["jaxnets_many_2dev_s"] = min(_seconds(lambda: train(split)) for _ in range(2))
        got, want = train(split)[0]["w1"], train(many)[0]["w1"]
        res["jaxnets_many_2dev_median_abs_diff_w1"] = float(np.median(np.abs(got - want)))
    # FLOPs of one net-iteration (S samples, D inputs, H hidden, O outputs), multiply-adds as 2:
    # forward and the two gradients 2S(DH + HO) each, the hidden error 2SHO, the update
    # 2(DH + HO); elementwise: a sigmoid 3 (negate, add, divide) plus one exp, the output error
    # 5 per output, the hidden error 3 per hidden unit.
    (s_, d_), h_, o_ = x.shape, w1.shape[2], w2.shape[2]
    res["flops_per_net_iteration"] = (
        4 * s_ * (d_ * h_ + h_ * o_)
        + 2 * s_ * h_ * o_
        + 2 * (d_ * h_ + h_ * o_)
        + 3 * s_ * (h_ + o_)
        + 5 * s_ * o_
        + 3 * s_ * h_
    )
    res["exps_per_net_iteration"] = s_ * (h_ + o_)
    scale = ITERATIONS / args.scaled_iterations
    k = args.scaled_iterations
    last1, last2 = _nets_last(w1, w2)
    numpy_nets_last(np, last1, last2, 2)  # warm-up (first-touch of the buffers)
    res["numpy_nets_last_many_f32_s"] = min(
        _seconds(lambda: numpy_nets_last(np, last1, last2, k)) * scale for _ in range(2)
    )
    res["numpy_einsum_many_f32_s"] = _seconds(lambda: numpy_einsum(np, w1, w2, k)) * scale
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.torch_threads)
        t1, t2 = torch.from_numpy(last1), torch.from_numpy(last2)
        compiled = torch.compile(_torch_nets_last_step)
        for step in (_torch_nets_last_step, compiled):  # warm-up; compiles the second
            torch_nets_last(torch, t1, t2, 3, step)
        res["torch_nets_last_many_f32_s"] = min(
            _seconds(lambda: torch_nets_last(torch, t1, t2, k)) * scale for _ in range(2)
        )
        res["torch_compile_nets_last_many_f32_s"] = min(
            _seconds(lambda: torch_nets_last(torch, t1, t2, k, compiled)) * scale for _ in range(2)
        )
        b1, b2 = torch.from_numpy(w1), torch.from_numpy(w2)
        torch_bmm(torch, b1, b2, 5)  # warm-up
        res["torch_bmm_many_f32_s"] = _seconds(lambda: torch_bmm(torch, b1, b2, k)) * scale
        res["torch_version"] = torch.__version__
        res["torch_threads"] = args.torch_threads
        ref = numpy_einsum(np, w1, w2, k)[0].transpose(1, 2, 0)
        for name, got in (
            ("numpy_nets_last", numpy_nets_last(np, last1, last2, k)[0]),
            ("torch_nets_last", torch_nets_last(torch, t1, t2, k)[0].numpy()),
            ("torch_compile_nets_last", torch_nets_last(torch, t1, t2, k, compiled)[0].numpy()),
        ):  # same weights as the reference formulation after k steps (f32 rounding apart)
            res[f"{name}_median_abs_diff_w1"] = float(np.median(np.abs(got - ref)))
    workload.emit(res)
    return res


if __name__ == "__main__":
    main()
