"""python -m atelier.segmentation: the segmentation service on the shared bootstrap.

    python -m atelier.segmentation --port 50052 --metrics-port 9452
    python -m atelier.segmentation --backend triton --triton-url 127.0.0.1:8001
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

from atelier.core.config import ServerConfig
from atelier.core.server import start
from atelier.segmentation.app import SegmentationApp, add_arguments



def main(argv=None) -> int:
    config = ServerConfig.from_args(argv, "segmentation", add_arguments=add_arguments)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = SegmentationApp(config)
    # atelier.core.server.serve() with one addition: app.attach(), so health follows the
    # Triton backend as well as loading and draining.
    running = start(app, config, app.metrics)
    app.attach(running)
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop_requested.set())
    while not stop_requested.wait(0.5):
        if running.wait_loaded(0) and running.load_error is not None:
            break
    running.stop(config.grace_seconds)
    return 1 if running.load_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
