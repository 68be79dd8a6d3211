"""moviepostproduction: controllable diffusion-transformer image generation for film post-production."""

__version__ = "0.1.0"
