"""Geometry analysis of trained representations (``ssljax analyze``): metrics and the command."""
