"""Language-model layer: sequence log-probs, preference losses, logits-SAM. Depends on the core, never the reverse."""

from dynamics.lm.logps import max_conf_logps, sequence_logps, token_logps  # noqa: E402, F401
from dynamics.lm.losses import LOSSES, PreferenceObjective, preference_loss  # noqa: E402, F401
from dynamics.lm.perturb import METHODS, PreferenceStep, compute_step, make_trainer_step  # noqa: E402, F401

# isort: split
from dynamics.lm.curvature import (  # noqa: E402, F401
    confidence_ratios_since,
    confidence_snapshot,
    model_token_curvature,
    predicted_head_step,
    sam_logit_perturbation,
    summarize_curvature,
    token_curvature_stats,
)

# isort: split
from dynamics.lm.data import (  # noqa: E402, F401
    KNOWN_DATASETS,
    collate_pairs,
    collate_sft,
    load_preference_data,
    synthetic_pairs,
)
from dynamics.lm.models import PRESETS, build_offline_tokenizer, build_tiny_model, load_model  # noqa: E402, F401
from dynamics.lm.probes import pair_logps, probe_metrics, run_probes  # noqa: E402, F401
from dynamics.lm.train import TrainConfig, sft_stage  # noqa: E402, F401  (not `train`: it would shadow the module)
