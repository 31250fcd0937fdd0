"""End-to-end fixtures are the integration ones."""

from tests.integration.conftest import mock_llm, start_gateway

__all__ = ["mock_llm", "start_gateway"]
