"""Test and demo support. Nothing here is imported by the package itself."""
