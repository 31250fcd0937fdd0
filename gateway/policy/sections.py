"""Policy sections owned by the individual capabilities (auth, limits, guardrails, ...).

Every field carries a docstring: they are the policy reference in the docs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.policy.types import Cidr, Duration, HostPort, Rate, SecretRef, Size

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384"]
"""JWS algorithms the gateway can verify (``none`` is never one of them)."""

_CFG = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Section(BaseModel):
    """Base of every policy section: unknown keys are errors, values are immutable."""

    model_config = _CFG


class UpstreamConfig(Section):
    """The service the sidecar protects."""

    url: str = Field(pattern=r"^https?://[^/\s]+(/.*)?$")
    """Base URL of the service, ``http://127.0.0.1:8000``; the request path is appended."""
    connect_timeout: Duration = 2.0
    """Longest wait for a pooled or new connection; exceeded → 503 ``upstream_connect_timeout``."""
    timeout: Duration = 60.0
    """Longest wait for the response headers and, while streaming, between two chunks;
    exceeded → 504 ``upstream_timeout`` (or the stream ends)."""
    pool_size: int = Field(default=256, ge=1, le=10000)
    """Most connections kept open to the upstream at once."""
    keepalive: Duration = 30.0
    """How long an idle pooled connection is kept."""
    preserve_host: bool = True
    """Send the client's ``Host`` header upstream (as Envoy does) rather than the URL's host."""


class StateConfig(Section):
    """Where rate-limit and budget counters live."""

    url: str = Field(
        default="memory://",
        pattern=r"^(memory|redis|rediss|redis\+sentinel|redis\+cluster)://",
    )
    """``memory://`` (one process, the default), ``redis://``, ``rediss://``,
    ``redis+sentinel://`` or ``redis+cluster://``."""
    on_error: Literal["allow", "deny", "local"] = "allow"
    """When the store fails: pass unlimited (``allow``, metered), answer 503 (``deny``) or
    limit in-process at ``limit / replicas`` (``local``)."""
    timeout: Duration = 0.05
    """Per-operation timeout of the store."""
    replicas: int = Field(default=1, ge=1)
    """How many sidecars share the store; used by ``on_error: local``."""
    password: SecretRef | None = None
    """Password of the Redis data nodes (sentinels are asked without one): ``{env: NAME}`` or
    ``{file: PATH}``; never written in ``url``."""
    key_prefix: str = Field(default="gw", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    """Prefix of every key; give each service its own when several share one Redis."""
    breaker_failures: int = Field(default=3, ge=1)
    """Consecutive store failures that open the circuit breaker: requests then skip the store
    (``on_error`` decides at once) until a background ping succeeds."""
    breaker_probe: Duration = 1.0
    """While the breaker is open, the store is pinged this often; the first answer closes it."""
    local_share: float = Field(default=0.0, ge=0.0, le=0.5)
    """Share (0 to 0.5) of a counter's remaining room this process may admit without asking
    the store (0, the default: every limited request makes one round trip; exact). After
    a request the store admitted, its counters' room ``R`` is known: the next requests are
    admitted in-process while they fit in ``local_share * R`` and ``local_ttl`` has not
    passed; what they add is written within 20 ms, merged per counter. Anything that does not
    fit asks the store, so refusals stay exact. One process never exceeds a limit this way
    (its unwritten additions are taken off the room). With several, a counter can be exceeded
    by what the others admitted and had not written yet (at most 20 ms of their in-process
    admissions), and, with more than ``1 / local_share`` processes (workers included), by
    their leases' excess over the room. Counted in ``gateway_state_local_admissions_total``;
    only for a shared store. Keep 0 where limits must be exact across replicas."""
    local_ttl: Duration = Field(default=0.25, gt=0, le=10)
    """How long the room learnt from the store is used (``local_share``) before it is
    asked again."""

    @model_validator(mode="after")
    def _no_inline_password(self) -> StateConfig:
        netloc = self.url.split("://", 1)[1].split("/", 1)[0]
        if ":" in netloc.rpartition("@")[0]:
            raise ValueError("no password in state.url: use state.password: {env: NAME}")
        return self


class ForwardHeaders(Section):
    """Headers that carry the verified identity to the service."""

    sub: str | None = "X-User-Id"
    """Header carrying the token's ``sub``."""
    tier: str | None = "X-User-Tier"
    """Header carrying the resolved tier."""
    claims: str | None = None
    """Optional header carrying all verified claims as one JSON object."""


class AuthConfig(Section):
    """JWT validation."""

    required: bool = True
    """Reject requests without a valid token; ``false`` makes the route public."""
    algorithms: list[Algorithm] = Field(default=["HS256"], min_length=1)
    """Allowed ``alg`` values; a token with any other is rejected."""
    secret: SecretRef | None = None
    """Shared secret for HS* algorithms: ``{env: NAME}`` or ``{file: PATH}``."""
    public_keys: list[str] = Field(default_factory=list)
    """PEM or JWK files with public keys for RS*/PS*/ES* algorithms."""
    jwks_url: str | None = Field(default=None, pattern=r"^https://")
    """HTTPS URL of a JWKS document."""
    jwks_refresh: Duration = 300.0
    """Periodic refetch of the JWKS."""
    jwks_cooldown: Duration = 30.0
    """Least time between two refetches triggered by an unknown ``kid``."""
    jwks_max_stale: Duration = 3600.0
    """How long the last good key set is used while the identity provider is unreachable."""
    jwks_ca: str | None = None
    """CA bundle for the JWKS URL; the system trust store otherwise."""
    max_token_bytes: Size = 8192
    """Longest accepted ``Authorization`` header; longer ones are rejected before decoding."""
    issuer: str | None = None
    """Required ``iss`` when set."""
    audience: str | list[str] | None = None
    """Required ``aud`` (one of them) when set."""
    leeway: Duration = 30.0
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
    tier_claim: str = "tier"
    """Claim holding the caller's tier."""
    default_tier: str | None = "free"
    """Tier for tokens with a missing or unknown tier; ``null`` denies such tokens."""
    tiers: list[str] | None = None
    """Tiers allowed on this route (403 ``insufficient_scope`` otherwise); all when unset."""
    forward_headers: ForwardHeaders = Field(default_factory=ForwardHeaders)
    """Identity headers sent upstream; client-sent copies are always removed."""
    cache_size: int = Field(default=10000, ge=0)
    """Verified-token cache entries (0 disables the cache)."""


class RateLimitConfig(Section):
    """Request, token and cost limits."""

    per_ip: Rate | None = None
    """Limit per client IP, e.g. ``100/minute``."""
    trusted_proxies: list[Cidr] = Field(default_factory=list)
    """Peers whose ``X-Forwarded-For`` is believed; the client is the right-most untrusted hop."""
    per_tier: dict[str, Rate] = Field(default_factory=dict)
    """Limit per user (``sub``) by tier, e.g. ``{free: 20/minute, pro: 600/minute}``."""
    per_route: Rate | None = None
    """Limit for the whole route, all callers together."""
    tokens_per_tier: dict[str, Rate] = Field(default_factory=dict)
    """LLM tokens per user by tier, e.g. ``{free: 20000/day}``."""
    daily_budget_usd: dict[str, float] = Field(default_factory=dict)
    """Cost budget per user and UTC day by tier, e.g. ``{free: 0.50}``."""
    default_max_tokens: int = Field(default=1024, ge=1)
    """Completion tokens reserved for an LLM request that sets no ``max_tokens`` (the real
    usage of the answer is what is charged in the end)."""


class GuardRule(Section):
    """One entry of a guardrail ``rules`` list: a rule pack by name, or an inline rule.

    Written as a pack name (``prompt-injection``), a pack with options
    (``{pack: waf, action: monitor, exclude: [sqli-comment]}``) or an inline rule
    (``{id: no-secrets, pattern: 'api[_-]?key', action: block}``).
    """

    pack: str | None = None
    """A shipped rule pack: ``prompt-injection``, ``waf`` or ``unsafe-markup``."""
    id: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    """Inline rule id: the ``rule`` label of metrics and the id named in rejections."""
    pattern: str | None = None
    """Inline rule pattern (RE2 syntax, matched case-insensitively on the normalised text)."""
    score: float = Field(default=1.0, gt=0.0, le=1.0)
    """1 decides alone; a smaller score is a signal that decides together with other matching
    signals once their scores add up to 1."""
    description: str | None = None
    """What the inline rule catches (for people; not used)."""
    exclude: list[str] = Field(default_factory=list)
    """With ``pack``: ids of the pack's rules to leave out."""

    @model_validator(mode="before")
    @classmethod
    def _pack_name(cls, data: Any) -> Any:
        return {"pack": data} if isinstance(data, str) else data

    @field_validator("pack")
    @classmethod
    def _known_pack(cls, value: str | None) -> str | None:
        if value is not None:
            from gateway.guard.packs import PackError, load_pack

            try:
                load_pack(value)
            except PackError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            from gateway.guard.engine import check_pattern

            problem = check_pattern(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _pack_or_inline(self) -> GuardRule:
        if self.pack is not None:
            if self.id is not None or self.pattern is not None:
                raise ValueError("give either pack or id and pattern, not both")
            from gateway.guard.packs import load_pack

            known = {r.id for r in load_pack(self.pack)}
            unknown = [rid for rid in self.exclude if rid not in known]
            if unknown:
                raise ValueError(f"exclude: {unknown} are not rules of pack {self.pack!r}")
        elif self.id is None or self.pattern is None:
            raise ValueError("an inline rule needs id and pattern (or name a pack)")
        elif self.exclude:
            raise ValueError("exclude only applies to a pack")
        return self


class InputRule(GuardRule):
    """A rule on prompts."""

    action: Literal["block", "sanitize", "monitor"] | None = None
    """What a match does; the section's ``action`` when unset."""


class OutputRule(GuardRule):
    """A rule on answers."""

    action: Literal["replace", "block", "monitor"] | None = None
    """What a match does; the section's ``action`` when unset."""


Decoding = Literal["url", "base64", "html"]
_INPUT_DECODE: tuple[Decoding, ...] = ("url", "base64")
_OUTPUT_DECODE: tuple[Decoding, ...] = ("html", "url")


def _check_paths(paths: list[str]) -> list[str]:
    from gateway.guard.extract import check_path

    for path in paths:
        check_path(path)
    return paths


class InputGuardConfig(Section):
    """Checks on prompts before they reach the service."""

    format: Literal["openai", "anthropic", "json_paths", "text", "none"] = "openai"
    """Where the prompt text is in the body: ``openai`` (messages[].content, text parts,
    tool_calls arguments, ``prompt``), ``anthropic`` (``system``, messages[].content blocks),
    ``json_paths``, ``text`` (the whole body, e.g. forms for the ``waf`` pack) or ``none``
    (query parameters only). A body that is not valid JSON → 400 ``invalid_request``."""
    json_paths: list[str] = Field(default_factory=list)
    """With ``format: json_paths``: paths such as ``$.player_input``, ``$.turns[*].text`` or
    ``$.meta.*``; every string at or under the path is checked."""
    roles: list[str] | None = None
    """With ``openai``/``anthropic``: message roles checked (``[user, tool]`` leaves your own
    system prompt out); all roles when unset."""
    query_params: list[str] = Field(default_factory=list)
    """Query parameters checked as well; ``"*"`` checks every parameter name and value."""
    max_chars: int | None = Field(default=None, ge=1)
    """Longest prompt text, per field (one message, one path's value, one parameter)."""
    on_too_long: Literal["refuse", "truncate"] = "refuse"
    """Over ``max_chars``: 400 ``prompt_rejected`` (rule ``max_chars``), or cut the text to
    ``max_chars`` and forward it."""
    max_depth: int = Field(default=32, ge=1, le=256)
    """Deepest JSON nesting accepted; deeper → 400 ``invalid_request``."""
    strip_control: bool = True
    """Remove control characters before checking (and forwarding with ``sanitize``)."""
    decode: list[Decoding] = Field(default_factory=lambda: list(_INPUT_DECODE))
    """Encodings looked through: URL-encoded text and base64 runs are decoded and checked too
    (``html`` entities as well when listed)."""
    rules: list[InputRule] = Field(default_factory=list)
    """Rule packs by name (``prompt-injection``, ``waf``) or inline ``{id, pattern, action}``."""
    action: Literal["block", "sanitize", "monitor"] = "block"
    """What a match does: ``block`` (400 ``prompt_rejected`` naming the rule id), ``sanitize``
    (the matched text and control characters are removed from what is forwarded; a match only
    visible in the normalised text blocks) or ``monitor`` (metric and log only)."""
    verdict_cache: int = Field(default=1024, ge=0, le=65536)
    """Prompt texts whose verdicts are kept (least recently used first out), per client: a
    system prompt or a chat history that the same identity (or, without one, the same client
    IP) sends again is not checked again. A verdict depends only on the text and this
    section, so a kept one is what a new check would give; keys are per client so that how
    fast an answer comes cannot tell one client what another sent. Texts longer than 8,192
    characters are always checked. ``0`` turns it off. Memory: at most this many texts, per
    distinct ``guardrails.input`` section: ~8 MB at the default if all were 8,192 ASCII
    characters long, up to four times that in other scripts."""

    @field_validator("json_paths")
    @classmethod
    def _valid_paths(cls, value: list[str]) -> list[str]:
        return _check_paths(value)

    @model_validator(mode="after")
    def _paths_with_format(self) -> InputGuardConfig:
        if self.format == "json_paths" and not self.json_paths:
            raise ValueError("format: json_paths needs json_paths")
        return self


class OutputGuardConfig(Section):
    """Checks on answers before they reach the client."""

    format: Literal["auto", "openai", "anthropic", "json_paths"] = "auto"
    """Where the answer text is: ``auto`` recognises OpenAI (chat and completions) and
    Anthropic answers and streams; ``json_paths`` reads ``json_paths`` of JSON answers."""
    json_paths: list[str] = Field(default_factory=list)
    """With ``format: json_paths``: paths of the answer text, e.g. ``$.npc_reply``."""
    max_chars: int | None = Field(default=None, ge=1)
    """Longest answer text."""
    rules: list[OutputRule] = Field(default_factory=list)
    """Rule packs by name (``unsafe-markup``) or inline ``{id, pattern, action}``."""
    fallback: str = "Sorry, I can't help with that."
    """Text substituted for an unsafe answer."""
    action: Literal["replace", "block", "monitor"] = "replace"
    """What a violation does: ``replace`` (the offending text becomes ``fallback`` in the same
    place; OpenAI ``finish_reason: content_filter``), ``block`` (502 ``unsafe_response``) or
    ``monitor`` (metric and log only). The answer carries ``X-Guardrail-Action``."""
    image_hosts: list[str] = Field(default_factory=list)
    """Hosts markdown images may point at; others count as exfiltration."""
    mask_pii: bool = False
    """Mask e-mail addresses, phone numbers and card numbers in answers."""
    skip_code: bool = True
    """Markup inside markdown code blocks and code spans is displayed, not rendered: leave it
    out of the markup rules (answers about HTML stay possible)."""
    decode: list[Decoding] = Field(default_factory=lambda: list(_OUTPUT_DECODE))
    """Encodings looked through in answers (HTML entities and URL encoding by default)."""
    stream_holdback: int = Field(default=64, ge=0, le=4096)
    """Characters of a streamed answer held back until the text after them is checked, so a
    pattern split across chunks is caught before any part of it is sent."""

    @field_validator("json_paths")
    @classmethod
    def _valid_paths(cls, value: list[str]) -> list[str]:
        return _check_paths(value)

    @model_validator(mode="after")
    def _paths_with_format(self) -> OutputGuardConfig:
        if self.format == "json_paths" and not self.json_paths:
            raise ValueError("format: json_paths needs json_paths")
        return self


class GuardrailsConfig(Section):
    """Prompt and answer guardrails."""

    input: InputGuardConfig | None = None
    """Checks on requests."""
    output: OutputGuardConfig | None = None
    """Checks on responses."""


class ModelPrice(Section):
    """Price of one model in USD."""

    input_per_1k: float = Field(ge=0)
    """USD per 1000 prompt tokens."""
    output_per_1k: float = Field(ge=0)
    """USD per 1000 completion tokens."""


class CostConfig(Section):
    """Price table used for cost metrics and budgets."""

    models: dict[str, ModelPrice] = Field(default_factory=dict)
    """Prices by model name."""
    default: ModelPrice | None = None
    """Price of models not in the table."""


class TelemetryConfig(Section):
    """Tracing, metrics and logs."""

    service_name: str = "gateway"
    """``service.name`` of spans and the ``service`` metric label."""
    otlp_endpoint: str | None = None
    """OTLP endpoint (``http://collector:4318``); the standard ``OTEL_EXPORTER_OTLP_*``
    variables otherwise; no export when neither is set (trace ids are still propagated)."""
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = None
    """OTLP protocol; ``OTEL_EXPORTER_OTLP_PROTOCOL`` or ``http/protobuf`` when unset."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Parent-based trace sampling ratio."""
    stage_spans: bool = False
    """Also record one child span per stage (``auth``, ``ratelimit``, ``guard_input``,
    ``guard_output``, ``usage``, ...) under the server span: a waterfall of where a request's
    time went. Off by default, like most proxies: a sampled request then records two spans
    (the server span and the ``upstream`` client span) instead of about nine, and every span
    costs CPU to record and export (``python -m bench.speed`` at sampling 0.1: the full chain
    went from ~890 to ~1,120 req/s when they were turned off). Turn it on while investigating
    latency."""
    export_priority: Literal["low", "idle"] = "low"
    """CPU priority of the span-export process (one per worker). ``low``: ``nice`` 10, it
    still gets its share of a busy machine. ``idle``: Linux ``SCHED_IDLE``, it runs only on
    CPU nothing else wants, so its batches never delay requests (the full chain's p99 at
    concurrency 1 fell ~1 ms on the bench machine), but while the cores are saturated it
    falls behind and the oldest queued spans are dropped (``gateway_spans_dropped_total``).
    Choose ``idle`` when tail latency matters more than complete traces under overload."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the JSON logs (one ``info`` line per request)."""
    access_log: bool = True
    """Write one JSON line per request."""
    log_prompts: int = Field(default=0, ge=0, le=4096)
    """For debugging only: write the first N characters of the prompt (as read by the input
    guardrail) into the request's log line. 0, the default, never logs prompt text."""


class TlsServer(Section):
    """Inbound TLS for the gRPC listener."""

    cert: str
    """Server certificate (PEM)."""
    key: str
    """Server private key (PEM)."""
    client_ca: str | None = None
    """CA that client certificates must chain to (mutual TLS): clients without a valid one
    are refused at the handshake. Unset: TLS without client certificates."""


class TlsClient(Section):
    """Outbound TLS to the gRPC upstream."""

    ca: str
    """CA the upstream's certificate must chain to."""
    cert: str | None = None
    """Client certificate presented to the upstream."""
    key: str | None = None
    """Client private key."""
    server_name: str | None = None
    """Name the upstream's certificate must carry when it is not the ``upstream`` host
    (``echo.pod.svc``); the connection still goes to ``upstream``."""

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsClient:
        if (self.cert is None) != (self.key is None):
            raise ValueError("set both cert and key (mutual TLS), or neither")
        return self


class GrpcConfig(Section):
    """The gRPC side of the proxy."""

    listen: HostPort = "0.0.0.0:50051"
    """gRPC listener address."""
    upstream: HostPort
    """gRPC service address."""
    tls: TlsServer | None = None
    """Inbound TLS / mTLS."""
    upstream_tls: TlsClient | None = None
    """Outbound TLS / mTLS."""
    plaintext: bool = False
    """Must be ``true`` explicitly to run without TLS; then a side without ``tls`` /
    ``upstream_tls`` is plaintext."""
    max_message_bytes: Size = 4 * 1024 * 1024
    """Largest gRPC message accepted either way; larger → ``RESOURCE_EXHAUSTED``."""
    timeout: Duration | None = None
    """Longest deadline of an upstream call: a client deadline that is shorter wins; exceeded
    → ``DEADLINE_EXCEEDED``. Unset: the client's deadline only."""
    tls_reload_interval: Duration = 5.0
    """How often the certificate files are checked for a change (secret rotation); new
    handshakes use the new files, open connections keep theirs."""

    @model_validator(mode="after")
    def _tls_or_plaintext(self) -> GrpcConfig:
        if not self.plaintext and (self.tls is None or self.upstream_tls is None):
            raise ValueError("set tls and upstream_tls, or plaintext: true explicitly")
        return self
