"""Integrations with public model code (VAR)."""

from . import var  # noqa: F401
