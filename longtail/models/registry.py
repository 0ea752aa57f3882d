"""Registries of the three model parts: backbone -> neck -> head."""

from longtail.core.registry import Registry

BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
