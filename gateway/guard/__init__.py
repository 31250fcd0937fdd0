"""LLM guardrails: rule packs on a linear-time engine, prompt extraction, answer checks, SSE.

* :mod:`gateway.guard.engine`: RE2 multi-pattern matching and the decision over matched rules;
* :mod:`gateway.guard.packs`: the shipped rule packs (``gateway/guard/packs/*.yaml``) and the
  resolution of a policy's ``rules`` list into compiled rules;
* :mod:`gateway.guard.extract`: where prompt text is in a request (openai, anthropic,
  json_paths, text, query parameters) and how it is rewritten;
* :mod:`gateway.guard.answer`: where answer text is in a response and the fallback edits;
* :mod:`gateway.guard.output`: the answer checks (rules, images, length, PII);
* :mod:`gateway.guard.sse`: the streaming filter with its bounded hold-back window.

The stages that use them are :mod:`gateway.stages.guard_input` and
:mod:`gateway.stages.guard_output`; the text view they read is :mod:`gateway.text`.
"""
