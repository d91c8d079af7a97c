"""Where the benchmark's reports go: one stem per run, ``<machine>-<date>``, in the output
folder, with a suffix per section."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .machine import machine_slug


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def stem(out_dir: str, info: dict, suffix: str = "") -> str:
    """``<out_dir>/<machine>-<YYYYmmdd-HHMMSS><suffix>`` (the folder is created)."""
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{machine_slug(info)}-{time.strftime('%Y%m%d-%H%M%S')}"
                                 f"{suffix}")


def write_json_md(path_stem: str, result: dict, markdown: str) -> list:
    """``<stem>.json`` and ``<stem>.md``; returns their paths."""
    paths = [path_stem + ".json", path_stem + ".md"]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=json_default)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths
