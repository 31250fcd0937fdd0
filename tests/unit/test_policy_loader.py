"""Policy loader: golden error messages and the documented shapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy import PolicyError, load_policy, load_policy_text

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "policy.yaml")
    return info.value.problems


def test_smallest_valid_file() -> None:
    policy = load_policy_text("version: 1\nupstream: {url: http://127.0.0.1:8000}\n")
    assert policy.auth is None and policy.rate_limits is None and policy.guardrails is None
    assert policy.max_body_bytes == 1024 * 1024
    assert policy.upstream.timeout == 60.0


@pytest.mark.parametrize("name", ["example.yaml", "demo.yaml", "minimal.yaml"])
def test_shipped_policies_are_valid(name: str) -> None:
    load_policy(ROOT / "policies" / name)


def test_typo_key_names_line_path_and_suggestion() -> None:
    text = "version: 1\nupstream: {url: http://x:1}\nauth:\n  requird: true\n"
    assert problems(text) == ["policy.yaml:4: auth.requird: unknown key (did you mean 'required'?)"]


def test_bad_duration() -> None:
    text = "version: 1\nupstream:\n  url: http://x:1\n  timeout: 5\n"
    assert problems(text) == [
        "policy.yaml:4: upstream.timeout: 5 is not a duration (use e.g. 250ms, 2s, 1m, 1h)"
    ]


def test_bad_rate() -> None:
    text = "version: 1\nupstream: {url: http://x:1}\nrate_limits:\n  per_tier: {free: 20/minnute}\n"
    assert problems(text) == [
        "policy.yaml:4: rate_limits.per_tier.free: '20/minnute' is not a rate"
        " (use e.g. 20/minute or 10/second;500/hour)"
    ]


def test_missing_upstream() -> None:
    assert problems("version: 1\n") == ["policy.yaml:1: upstream: required"]


def test_bad_size_and_version() -> None:
    assert problems("version: 2\nupstream: {url: http://x:1}\nmax_body_bytes: 1MB2\n") == [
        "policy.yaml:1: version: 2 is not allowed: 1",
        "policy.yaml:3: max_body_bytes: '1MB2' is not a size"
        " (use e.g. 512KiB, 1MiB or a byte count)",
    ]


def test_inline_secret_refused() -> None:
    text = "version: 1\nupstream: {url: http://x:1}\nauth:\n  secret: hunter2\n"
    out = problems(text)
    assert out == [
        "policy.yaml:4: auth.secret: secrets are never written inline:"
        " use {env: NAME} or {file: PATH}"
    ]
    assert "hunter2" not in "".join(out)


def test_yaml_syntax_error_has_line() -> None:
    assert problems("version: 1\nupstream: {url: http://x:1\nfoo: [\n")[0].startswith(
        "policy.yaml:3: invalid YAML"
    )


def test_duplicate_key() -> None:
    text = "version: 1\nupstream: {url: http://x:1}\nupstream: {url: http://y:1}\n"
    assert problems(text) == ["policy.yaml:3: duplicate key 'upstream'"]


def test_route_errors_point_at_the_route() -> None:
    text = (
        "version: 1\nupstream: {url: http://x:1}\nroutes:\n"
        "  - {name: a, path: /a}\n"
        "  - {name: b, path: b, auth: {required: nope}}\n"
    )
    assert problems(text) == [
        "policy.yaml:5: routes.1.path: 'b' does not match ^/[^\\s?#]*$",
        "policy.yaml:5: routes.1.auth.required: Input should be a valid boolean,"
        " unable to interpret input",
    ]


def test_route_overrides_merge_with_top_level() -> None:
    text = (
        "version: 1\nupstream: {url: http://x:1}\n"
        "auth: {issuer: https://idp/, secret: {env: S}}\n"
        "routes:\n  - {name: p, path: /p, auth: {tiers: [pro]}}\n"
    )
    route = load_policy_text(text).routes[0]
    assert route.auth is not None
    assert route.auth.tiers == ["pro"] and route.auth.issuer == "https://idp/"


def test_unreadable_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(bad)


def test_grpc_requires_tls_or_explicit_plaintext() -> None:
    text = "version: 1\nupstream: {url: http://x:1}\ngrpc: {upstream: 127.0.0.1:1}\n"
    assert problems(text) == [
        "policy.yaml:3: grpc: set tls and upstream_tls, or plaintext: true explicitly"
    ]
