"""Embedded public-domain corpus (see README.md in this folder)."""
