"""Adapters for other ecosystems (imported as paged_backend.integrations)."""
