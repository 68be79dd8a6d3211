"""Pipelines: orchestration only (encode, prepare, sample, decode); models and samplers live elsewhere."""
