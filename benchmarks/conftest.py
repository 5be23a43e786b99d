"""Benchmarks share the pytest-benchmark fixture; each module declares the ratios it is judged by in
``RATIOS`` (see report.py), so comparisons are always between timings taken in the same run."""
import pytest


@pytest.fixture(scope="session")
def torch():
    """Benchmarks against torch skip cleanly where torch is not installed."""
    return pytest.importorskip("torch")


def two_layer_gemms(X, W, a, S, G):
    """The five GEMMs of a two-layer forward + backward, nothing else: the numpy bound the fused kernels are judged
    against (X [n, d], W [m, d], a [k, m], S [n, m] hidden activations, G [n, k] output gradients)."""
    Z = X @ W.T          # pre-activations
    F = S @ a.T          # outputs
    da = G.T @ S         # output-layer gradient
    dS = G @ a           # backprop into the hidden layer
    dW = dS.T @ X        # input-layer gradient
    return Z, F, da, dW
