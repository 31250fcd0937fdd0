"""The gRPC test service (``echo.proto``), its stubs generated at test time, and certificates."""
