"""Copy the trained models from the work folder into services/atelier/embedded/, each folder
in one rename, so the registry never sees a half-written model.

    python -m atelier.toyworld.ship
"""
from __future__ import annotations

import shutil
import sys

from .train_common import EMBEDDED, WORK_DIR

SHIPPED = ("toy", "toy-sam", "toy-evaluator")


def ship(names=SHIPPED) -> None:
    EMBEDDED.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = WORK_DIR / name, EMBEDDED / name
        if not src.exists():
            sys.exit(f"missing {src}: train it first")
        tmp = EMBEDDED / f".{name}.incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        old = EMBEDDED / f".{name}.old"
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
        print(f"shipped {dst}")


if __name__ == "__main__":
    ship(sys.argv[1:] or SHIPPED)
