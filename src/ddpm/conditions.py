"""Moved to ``ddpm.conditioning``; this name stays for code written against it."""

from .conditioning import (
    balanced_classes,
    check_request,
    check_text,
    class_index,
    grid_prompts,
    guided_network,
    warn_cut_prompts,
)

__all__ = [
    "balanced_classes",
    "check_request",
    "check_text",
    "class_index",
    "grid_prompts",
    "guided_network",
    "warn_cut_prompts",
]
