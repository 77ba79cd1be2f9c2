"""``python -m atelier.models``: put model folders where the services read them (see pull.py)."""
