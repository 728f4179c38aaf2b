"""Moved to ``ddpm.conditioning.guidance``; this name stays for code written against it."""

from .conditioning.guidance import MAX_GUIDANCE, ConditionalModel, Guidance, check_guidance, guided

__all__ = ["MAX_GUIDANCE", "ConditionalModel", "Guidance", "check_guidance", "guided"]
