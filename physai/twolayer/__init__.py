"""Two-layer networks with fused native kernels: forward, loss+gradient, Hessian-vector products and a
gradient-descent loop, for ensembles, in float32 and float64. ``physai.twolayer.torch`` wires them into torch."""
from physai.twolayer.model import HessianOperator, Trajectory, TwoLayer
from physai.twolayer.params import ACTIVATIONS, LOSSES, PARAMETERIZATIONS, Scaling, scaling

__all__ = ["TwoLayer", "Trajectory", "HessianOperator", "ACTIVATIONS", "LOSSES", "PARAMETERIZATIONS", "Scaling", "scaling"]
