"""LLM request and answer formats: usage estimates, usage in answers and streams, prices."""
