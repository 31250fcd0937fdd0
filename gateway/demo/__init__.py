"""Demo helpers bundled with the gateway (mock upstream LLM service)."""
