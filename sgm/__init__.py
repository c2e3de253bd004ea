"""The library the four stages import beyond common.py: neuron sites and hooks, models, artifacts, judges, served endpoints, the report."""
