"""Integrations with public model code (VAR, Infinity)."""

from . import infinity, var  # noqa: F401
