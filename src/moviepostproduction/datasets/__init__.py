"""Training data from a user's own images (docs/training-data.md): the real-data sample format and its WebDataset
shards (real_format.py), resolution buckets (buckets.py), COCO instance annotations read and checked (coco.py), their
masks decoded (masks.py) and turned into samples (coco_sample.py, crops.py), scene files with RGBA refs (scenes.py),
depth labels (depth_rule.py), skip counts and one-line errors (problems.py), the `mpp prepare-data` driver
(prepare.py) and a generated COCO-style set for measurements and tests (sample_set.py)."""
