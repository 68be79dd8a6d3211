"""Backbones: conditioned FLUX (by injection into diffusers' model) and NanoDiT."""
