"""python -m atelier.inversion: the inversion service (DDIM / SPDInv, P2P / MasaCtrl editing).

    python -m atelier.inversion --port 50051 --metrics-port 9451 --model sd15=/models/sd-v1-5
"""
from __future__ import annotations

import sys

from atelier.core.config import ServerConfig
from atelier.core.server import serve
from atelier.inversion.app import InversionApp, add_arguments


def main(argv=None) -> int:
    config = ServerConfig.from_args(argv, "inversion", add_arguments=add_arguments)
    return serve(InversionApp(config), config)


if __name__ == "__main__":
    sys.exit(main())
