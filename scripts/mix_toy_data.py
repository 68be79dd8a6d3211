"""One toy data set made of the shards of others, for a recipe with `buckets: native` (one size per batch).

    python scripts/mix_toy_data.py --out build/mixed-data build/toy-data-2k build/dense-data:2

Each source is `DIR` (all its shards) or `DIR:K` (its first K shards of each split). The output's train/ and
heldout/ hold symbolic links to the sources' shard files, interleaved (first shard of each source, then the second,
...) so that a recipe `limit:` takes from every source. Its manifest.json is the first source's (so an export records
that toy world, the one `mpp eval` then scores by default), with the splits recounted and the sources listed under
`mixed_from`. Nothing is copied; the sources must stay where they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import zip_longest
from pathlib import Path

from moviepostproduction.files import write_json_atomic
from moviepostproduction.training.sample_stream import shard_length

SPLITS = ("train", "heldout")


def parse_source(text: str) -> tuple[Path, int | None]:
    folder, _, count = text.partition(":")
    if count and not (count.isdigit() and int(count) > 0):
        raise SystemExit(f"source {text!r}: expected DIR or DIR:K with K a positive number of shards")
    path = Path(folder)
    if not (path / "manifest.json").is_file():
        raise SystemExit(f"source {folder}: no manifest.json (expected `mpp prepare-data` output)")
    return path, int(count) if count else None


def mix(out: Path, sources: list[tuple[Path, int | None]]) -> dict:
    """Write out/ (see the module docstring); returns its manifest."""
    manifests = [json.loads((path / "manifest.json").read_text()) for path, _ in sources]
    if any(m.get("format") != manifests[0].get("format") for m in manifests):
        raise SystemExit("sources: every source must be toy-world shards of one format")
    manifest = {**manifests[0], "splits": {}, "mixed_from": []}
    for (path, count), source in zip(sources, manifests, strict=True):
        manifest["mixed_from"].append({"data": str(path.resolve()), "shards_per_split": count, **source})
    for split in SPLITS:
        files = [sorted((path / split).glob("shard-*.tar"))[:count] for path, count in sources]
        mixed = [f for group in zip_longest(*files) for f in group if f is not None]
        (out / split).mkdir(parents=True)
        names = []
        for i, file in enumerate(mixed):
            name = f"{split}/shard-{i:06d}.tar"
            (out / name).symlink_to(file.resolve())
            names.append(name)
        manifest["splits"][split] = {"count": sum(shard_length(f) for f in mixed), "shards": names}
    write_json_atomic(manifest, out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="New folder (must not exist).")
    parser.add_argument("sources", nargs="+", help="DIR or DIR:K (the first K shards of each split).")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"--out {args.out}: already exists")
    manifest = mix(args.out, [parse_source(s) for s in args.sources])
    counts = ", ".join(f"{split} {manifest['splits'][split]['count']}" for split in SPLITS)
    print(f"wrote {args.out}: {counts} scenes from {len(args.sources)} sources")


if __name__ == "__main__":
    sys.exit(main())
