"""Logit-space dynamics of the squeezing effect (theory core) and logits-SAM for causal LMs (`dynamics.lm`)."""
from dynamics.logit_space import (  # noqa: E402,F401
    hessian_eigh,
    log_softmax,
    logit_hessian,
    modal_coefficients,
    ntk,
    one_hot,
    param_hessian,
    residual,
    softmax,
)
from dynamics.steps import (  # noqa: E402,F401
    effective_radius,
    sam_logit_increment,
    sam_logit_step,
    sam_param_step,
    sam_perturbation,
)
