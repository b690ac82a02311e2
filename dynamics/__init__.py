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
from dynamics.simulate import (  # noqa: E402,F401
    Setting,
    Trajectory,
    load_trajectories,
    save_trajectories,
    simulate,
    simulate_logits,
    simulate_params,
)
from dynamics.steps import (  # noqa: E402,F401
    effective_radius,
    sam_logit_increment,
    sam_logit_step,
    sam_param_step,
    sam_perturbation,
)
from dynamics.theory import (  # noqa: E402,F401
    confidence_ratios,
    log_confidence_ratios,
    modal_gains,
    predicted_logit_increment,
    predicted_logit_step,
    predicted_modal_step,
    predicted_param_increment,
    predicted_param_step,
    predicted_residual,
    predicted_residual_increment,
    runner_up,
    s6_sign_fact,
    s6_sign_vector,
    step_confidence_ratios,
)
from dynamics.toy import ToyConfig, class_roles, run_toy, toy_record  # noqa: E402,F401

# isort: split
from dynamics.spectrum import (  # noqa: E402,F401
    full_spectrum,
    hz_matvec,
    secular_function,
    top_mode_batched,
    top_mode_share,
    top_modes,
)
