"""Smoke test of experiments.l1_sparsity: proximal L1 recovers the support with exact zeros."""

import dataclasses
import json

import numpy as np

from experiments import l1_sparsity


def test_proximal_l1_recovers_support_with_exact_zeros(tmp_path):
    config = dataclasses.replace(
        l1_sparsity.get_config(),
        n_features=50,
        n_informative=5,
        n_train=80,
        n_test=200,
        steps=300,
        l1=0.2,
        workdir=str(tmp_path),
    )
    results = l1_sparsity.main(config)

    prox = results["l1_proximal"]
    assert prox["recall"] == 1.0 and prox["precision"] == 1.0
    assert prox["exact_zeros"] == 45 and prox["max_abs_off_support"] == 0.0
    assert results["elastic_net"]["recall"] == 1.0
    for name in ("l1_subgradient", "no_regularization", "l2_coupled", "l2_decoupled"):
        assert results[name]["exact_zeros"] == 0, name
        assert results[name]["precision"] == 5 / 50, name
    # The subgradient shrinks the off-support weights but leaves them oscillating around 0.
    assert 0 < results["l1_subgradient"]["max_abs_off_support"] < 0.1
    assert prox["test_loss"] < 0.6 * results["no_regularization"]["test_loss"]
    # With the momentum-matched rates coupled and decoupled L2 share their stationary point.
    np.testing.assert_allclose(
        results["l2_coupled"]["test_loss"], results["l2_decoupled"]["test_loss"], rtol=1e-3
    )

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"] == results
    assert summary["config"]["l1"] == 0.2
    assert (tmp_path / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
