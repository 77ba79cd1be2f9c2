"""python -m atelier.synthesis: the synthesis service (GradOP+, SDEdit, ISA-DCA variations).

    python -m atelier.synthesis --port 50054 --metrics-port 9454 --inversion-address 127.0.0.1:50051
"""
from __future__ import annotations

import sys

from atelier.core.config import ServerConfig
from atelier.core.server import serve
from atelier.synthesis.app import SynthesisApp, add_arguments


def main(argv=None) -> int:
    config = ServerConfig.from_args(argv, "synthesis", add_arguments=add_arguments)
    return serve(SynthesisApp(config), config)


if __name__ == "__main__":
    sys.exit(main())
