"""Language-model layer: sequence log-probs, preference losses, logits-SAM. Depends on the core, never the reverse."""
