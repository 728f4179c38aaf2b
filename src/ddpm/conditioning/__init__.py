"""What a network is conditioned on, and guidance: one conditioner per run (nothing, class ids or text;
it owns the null condition, turns a request into each sample's condition and builds the guided
network), one guidance value, and the checks a request gets. Every kind of condition answers one
protocol (``Condition``); class ids are ``ClassIds``."""

from .condition import ClassIds, Condition, as_condition
from .conditioner import (
    NULL_TEXT,
    ClassConditioner,
    ConditionRequest,
    LowResConditioner,
    PerSample,
    TextConditioner,
    TrainingConditions,
    Unconditional,
    check_request,
    guided_network,
    make_conditioner,
    with_condition,
)
from .guidance import MAX_GUIDANCE, Guidance, autoguided, check_guidance, guided
from .requests import balanced_classes, check_text, class_index, grid_prompts, warn_cut_prompts

__all__ = [
    "MAX_GUIDANCE",
    "NULL_TEXT",
    "ClassConditioner",
    "ClassIds",
    "Condition",
    "ConditionRequest",
    "LowResConditioner",
    "Guidance",
    "PerSample",
    "TextConditioner",
    "TrainingConditions",
    "Unconditional",
    "as_condition",
    "autoguided",
    "balanced_classes",
    "check_guidance",
    "check_request",
    "check_text",
    "class_index",
    "grid_prompts",
    "guided",
    "guided_network",
    "make_conditioner",
    "warn_cut_prompts",
    "with_condition",
]
