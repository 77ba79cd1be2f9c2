"""Fixtures for the SDK tests (helpers live in sdk_fakes, a uniquely named module)."""
from sdk_fakes import fake_and_client, servers  # noqa: F401  (pytest fixtures)
