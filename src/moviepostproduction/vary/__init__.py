"""vary: NanoDiT, a small DiT conditioned on DINO CLS + patch tokens + text, with dual CFG (seed 003)."""
