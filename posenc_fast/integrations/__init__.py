"""Integrations with public model code (VAR)."""
