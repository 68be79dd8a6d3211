"""Peak RSS of a feature-cache build, run alone in a fresh process (tests/test_feature_cache.py, docs/training.md).

    MALLOC_MMAP_THRESHOLD_=131072 python tests/cache_build_rss.py MODEL_DIR SHARD_DIR CACHE_DIR N [MAX_TEXT_TOKENS]

writes the cache of the first N samples of SHARD_DIR (encoders on the CPU, one thread, shards of 8 samples) and
prints one JSON line: the samples, the cache's bytes on disk and the process's peak RSS (ru_maxrss) in bytes.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def main(model: str, shards: str, cache: str, n: int, tokens: int = 512) -> dict:
    from moviepostproduction.training.cache_encoders import CacheEncoders
    from moviepostproduction.training.feature_cache import write_cache

    torch.set_num_threads(1)
    meta = {"model": model, "limit": str(n)}
    sizes = {"max_refs": 4, "max_text_tokens": tokens, "batch_size": 8, "shard_size": 8}
    built = write_cache(shards, cache, CacheEncoders(model, "cpu"), meta=meta, limit=n, progress=False, **sizes)
    on_disk = sum(f.stat().st_size for f in Path(cache).glob("shard-*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"samples": len(built), "cache_bytes": on_disk, "peak_rss": peak}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], args[1], args[2], int(args[3]), *(int(a) for a in args[4:]))))
