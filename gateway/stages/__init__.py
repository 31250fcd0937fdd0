"""Stages plug into the pipeline here: each factory builds the stages one route needs.

A factory is ``(route, build) -> list[stage]``; it reads the route's effective sections,
compiles everything it needs now (nothing on the hot path parses or compiles), and registers
shared resources, start/close hooks and readiness checks on ``build``.
"""

from __future__ import annotations

from gateway.pipeline import StageFactory
from gateway.stages.auth import build_auth_stages
from gateway.stages.guard_input import build_input_guard_stages
from gateway.stages.guard_output import build_output_guard_stages
from gateway.stages.ratelimit import build_ratelimit_stages
from gateway.stages.usage import build_usage_stages

FACTORIES: tuple[StageFactory, ...] = (
    build_auth_stages,
    build_ratelimit_stages,
    build_usage_stages,
    build_input_guard_stages,
    build_output_guard_stages,
)
