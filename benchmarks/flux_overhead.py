"""Conditioning overhead against plain FLUX: `python benchmarks/flux_overhead.py [mpp bench options]`.

The same as `mpp bench`; see docs/benchmarks.md for the method and the measured table.
"""

import sys

from moviepostproduction.cli import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]])
