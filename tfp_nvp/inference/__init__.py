"""Flows inside probabilistic programs: surrogate posteriors for JointDistribution models, and NeuTra MCMC."""

from tfp_nvp.inference.vi import neutra_initial_state, neutra_kernel, neutra_trace_fn, surrogate_posterior

__all__ = ["neutra_initial_state", "neutra_kernel", "neutra_trace_fn", "surrogate_posterior"]
