"""Personalization: concept training as durable jobs (EqDiff, LayerDiffusion)."""
