"""``python -m atelier.personalization`` with the textual-inversion test method (for tests that
kill the server process)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from atelier.core.config import ServerConfig  # noqa: E402
from atelier.core.server import serve  # noqa: E402
from atelier.personalization.app import PersonalizationApp, add_arguments  # noqa: E402
from ti_method import TextualInversionMethod  # noqa: E402


def main(argv=None) -> int:
    config = ServerConfig.from_args(argv, "personalization", add_arguments=add_arguments)
    app = PersonalizationApp(config, methods={"eqdiff": TextualInversionMethod()})
    return serve(app, config, on_started=app.attach)


if __name__ == "__main__":
    sys.exit(main())
