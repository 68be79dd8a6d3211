"""`mpp bench`: conditioning overhead against plain diffusers FLUX, side by side (docs/benchmarks.md)."""
