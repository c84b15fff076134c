"""Steering: the exported vectors (apply, save, load) and the serving formats (lm-eval, llama.cpp, merged)."""

from corrsteer_pl.steering.vectors import SteeringVectors, load_steered_model

__all__ = ["SteeringVectors", "load_steered_model"]
