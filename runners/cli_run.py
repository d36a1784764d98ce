"""Spec commands of the nanorun CLI: validate, plan, apply."""
