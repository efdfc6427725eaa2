"""Closeness of two training runs that differ only in fp32 summation order, with derived tolerances.

Layouts (one process, EP2, EP4, ...) sum the same per-token gradient terms in another order, so a
gradient element differs by about eps32 times the sum of its terms' magnitudes. Where the terms
nearly cancel (an embedding row that few tokens touch, an adapter slice early in training), that is
a visible fraction of the element itself, and AdamW's normalised step lr * m / (sqrt(v) + eps)
(at most about lr in size) carries the fraction into the weight. Over a run the difference is
therefore bounded by a fraction of the distance Adam can move a weight, sum_t lr_t <= steps * lr,
and not by a fixed number tuned to one machine: a test that raises lr or adds steps gets a tolerance
that grows with them. RATIO = 1/64 of that distance leaves room for a sign flip of one step's
update in a near-cancelled element over 32 steps, while a real bug (a missed all-reduce, a wrong
expert slice, a lost gradient) moves weights by a whole step or more, far outside it.
"""

import torch

RATIO = 1.0 / 64
RTOL = 1e-4  # fp32 relative rounding over a few hundred summands, for weights far from zero


def adam_drift_atol(lr: float, steps: int) -> float:
    """Absolute tolerance for weights after `steps` AdamW steps at peak learning rate `lr`."""
    return steps * lr * RATIO


def assert_tensors_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, where: str):
    """assert_close that always says where, by how much, at which index, and against what tolerance."""
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{where} (atol={atol:.3g}, rtol={rtol:.3g}): {m}"
    )


def assert_weights_close(actual: dict, expected: dict, *, lr: float, steps: int, where: str):
    """Every tensor of two state dicts within the Adam drift tolerance; names the worst tensor."""
    assert set(actual) == set(expected), f"{where}: names differ: {sorted(set(actual) ^ set(expected))[:10]}"
    atol = adam_drift_atol(lr, steps)
    worst = max(
        expected,
        key=lambda k: (actual[k].double() - expected[k].double()).abs().max().item() if expected[k].numel() else 0.0,
    )
    for name in sorted(expected, key=lambda k: k != worst):  # the worst tensor reports first
        assert_tensors_close(actual[name], expected[name], atol=atol, rtol=RTOL, where=f"{where}: {name}")
