"""Data: the procedural toy world (synthetic.py) and its WebDataset shards (shards.py)."""
