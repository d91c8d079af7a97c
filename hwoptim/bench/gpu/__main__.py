"""``python -m hwoptim.bench.gpu OUTDIR [--quick] [--budget S]``: the GPU benchmark."""
import sys

from .cli import main

sys.exit(main())
