"""Adapters that put a Distiller into a framework's own training loop."""
