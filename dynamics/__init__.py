"""Logit-space dynamics of the squeezing effect (theory core) and logits-SAM for causal LMs (`dynamics.lm`)."""
