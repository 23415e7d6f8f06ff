"""hypergrad: composable hypergradient primitives for PyTorch (torch.func pytrees).

See README.md for the quickstart and docs/api/index.md for a table of every public name.
"""

from . import distributed, testing, tree
from .finite_difference import (
    FiniteDifferenceOperator,
    default_fd_step,
    fd_hvp,
    fd_mixed_vjp,
)
from .fixed_point import fixed_point_grad, fixed_point_solution
from .forward import forward_hypergrad, implicit_jacobian, implicit_jvp, step_jvp
from .implicit import (
    DoubleBackwardError,
    HypergradientError,
    HypergradientWarning,
    implicit_grad,
    implicit_solution,
)
from .meta_loop import CheckpointError, MetaPretrainer
from .modules import FunctionalModule
from .pretraining import PretrainingHypergrad, pretraining_hypergrad
from .products import HessianOperator, hvp, make_hvp, mixed_vjp
from .solvers import (
    SolveResult,
    adam_preconditioner,
    cg,
    default_tol,
    gmres,
    minres,
    neumann,
    normal_cg,
    nystrom,
    power_iteration,
)
from .solvers.sama import sama
from .stochastic import stochastic_hvp
from .transformable import functional_implicit_grad
from .unroll import gradient_step, optimizer_step, unroll

__all__ = [
    "tree",
    "distributed",
    "testing",
    "hvp",
    "make_hvp",
    "mixed_vjp",
    "HessianOperator",
    "FiniteDifferenceOperator",
    "fd_hvp",
    "fd_mixed_vjp",
    "default_fd_step",
    "SolveResult",
    "default_tol",
    "cg",
    "neumann",
    "power_iteration",
    "adam_preconditioner",
    "gmres",
    "minres",
    "normal_cg",
    "nystrom",
    "sama",
    "stochastic_hvp",
    "implicit_grad",
    "implicit_solution",
    "functional_implicit_grad",
    "fixed_point_grad",
    "fixed_point_solution",
    "implicit_jvp",
    "implicit_jacobian",
    "forward_hypergrad",
    "step_jvp",
    "FunctionalModule",
    "HypergradientWarning",
    "HypergradientError",
    "DoubleBackwardError",
    "unroll",
    "gradient_step",
    "optimizer_step",
    "pretraining_hypergrad",
    "PretrainingHypergrad",
    "MetaPretrainer",
    "CheckpointError",
]

__version__ = "0.1.0"
