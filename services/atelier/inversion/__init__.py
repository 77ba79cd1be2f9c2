"""inversion."""
