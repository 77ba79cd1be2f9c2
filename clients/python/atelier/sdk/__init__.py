"""The Atelier SDK (filled in by the SDK module)."""
__all__: list[str] = []
