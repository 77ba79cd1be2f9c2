"""python -m atelier.segmentation: the segmentation service on the shared bootstrap.

    python -m atelier.segmentation --port 50052 --metrics-port 9452
    python -m atelier.segmentation --backend triton --triton-url 127.0.0.1:8001
"""
from __future__ import annotations

import sys

from atelier.core.config import ServerConfig
from atelier.core.server import serve
from atelier.segmentation.app import SegmentationApp, add_arguments


def main(argv=None) -> int:
    config = ServerConfig.from_args(argv, "segmentation", add_arguments=add_arguments)
    app = SegmentationApp(config)
    # Health follows the Triton backend too: the bootstrap polls app.backend_readiness().
    return serve(app, config, app.metrics)


if __name__ == "__main__":
    sys.exit(main())
