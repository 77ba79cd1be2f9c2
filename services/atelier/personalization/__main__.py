"""python -m atelier.personalization: durable concept-training jobs and generation.

    python -m atelier.personalization --port 50053 --metrics-port 9453 \
        --data-dir /var/lib/atelier --segmentation-address segmentation:50052
    # several replicas: the same --database postgresql://... and a shared --artifact-dir
"""
from __future__ import annotations

import sys

from atelier.core.config import ServerConfig
from atelier.core.server import serve
from atelier.personalization.app import PersonalizationApp, add_arguments


def main(argv=None) -> int:
    config = ServerConfig.from_args(argv, "personalization", add_arguments=add_arguments)
    app = PersonalizationApp(config)
    return serve(app, config, on_started=app.attach)


if __name__ == "__main__":
    sys.exit(main())
