"""Command line: ``gateway run | check | demo | token | mock-llm``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from gateway.policy import PolicyError, load_policy
from gateway.units import parse_duration


def _run(args: argparse.Namespace) -> int:
    from pydantic import TypeAdapter, ValidationError

    from gateway.policy.types import HostPort

    try:
        for value in (args.listen, args.admin_listen):
            if value:
                TypeAdapter(HostPort).validate_python(value)
        if args.upstream and not args.upstream.startswith(("http://", "https://")):
            raise ValueError(f"{args.upstream!r} is not an http(s) URL")
    except (ValidationError, ValueError) as exc:
        print(f"gateway run: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and not args.worker:
        # Before anything imports prometheus-client: the supervisor keeps no metrics.
        return _supervise(args)
    from gateway.server import Overrides, serve

    overrides = Overrides(args.listen, args.admin_listen, args.upstream)
    try:
        return _loop_run(serve(Path(args.config), overrides, worker=args.worker))
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError as exc:  # a policy that loads but cannot be built (missing secret, ...)
        print(f"gateway run: {exc}", file=sys.stderr)
        return 1


def _supervise(args: argparse.Namespace) -> int:
    from gateway.telemetry.logging import setup_logging
    from gateway.workers import Supervisor, check_policy

    try:
        policy = load_policy(args.config)
        check_policy(policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"gateway run: {exc}", file=sys.stderr)
        return 1
    setup_logging(policy.telemetry.log_level)
    argv = ["-c", args.config]
    for flag, value in (
        ("--listen", args.listen),
        ("--admin-listen", args.admin_listen),
        ("--upstream", args.upstream),
    ):
        if value:
            argv += [flag, value]
    return Supervisor(argv, args.workers).run()


def _loop_run(coro: object) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return int(asyncio.run(coro))  # type: ignore[arg-type]


def _check(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        try:
            load_policy(name)
        except PolicyError as exc:
            print(exc)
            status = 1
        else:
            print(f"{name}: ok")
    return status


def _token(args: argparse.Namespace) -> int:
    from gateway.tokens import mint_token

    try:
        policy = load_policy(args.config)
        print(mint_token(policy, args.sub, args.tier, parse_duration(args.ttl)))
    except (PolicyError, ValueError) as exc:
        print(f"gateway token: {exc}", file=sys.stderr)
        return 1
    return 0


def _mock_llm(args: argparse.Namespace) -> int:
    from gateway.demo.mock_llm import MockLLMConfig, serve
    from gateway.policy.types import split_hostport

    host, port = split_hostport(args.listen)
    cfg = MockLLMConfig(token_latency=parse_duration(args.token_latency))
    _loop_run(serve(host, port, cfg))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.runner import run_demo

    return _loop_run(run_demo(Path(args.config), args.mock_listen))


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gateway`` command."""
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve with a policy file")
    run.add_argument("-c", "--config", required=True, help="policy YAML file")
    run.add_argument("--listen", help="HOST:PORT for clients (overrides the file)")
    run.add_argument("--admin-listen", help="HOST:PORT for /healthz /readyz /metrics")
    run.add_argument("--upstream", help="upstream base URL (overrides upstream.url)")
    run.add_argument(
        "--workers",
        type=_positive,
        default=int(os.environ.get("GATEWAY_WORKERS", "1")),
        help="worker processes sharing the ports (default 1, or $GATEWAY_WORKERS)",
    )
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=_run)

    check = sub.add_parser("check", help="validate policy files; exit 1 on the first bad one")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=_check)

    demo = sub.add_parser("demo", help="the mock LLM service and the gateway, ready to try")
    demo.add_argument("-c", "--config", default="policies/demo.yaml")
    demo.add_argument("--mock-listen", default="127.0.0.1:8000")
    demo.set_defaults(func=_demo)

    token = sub.add_parser("token", help="mint an HS* token with the policy's secret")
    token.add_argument("--sub", required=True)
    token.add_argument("--tier", required=True)
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m or 1h")
    token.add_argument("-c", "--config", default="policies/demo.yaml")
    token.set_defaults(func=_token)

    mock = sub.add_parser("mock-llm", help="the mock OpenAI-compatible LLM service alone")
    mock.add_argument("--listen", default="127.0.0.1:8000")
    mock.add_argument("--token-latency", default="0ms", help="delay per token, e.g. 20ms")
    mock.set_defaults(func=_mock_llm)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``gateway`` console script."""
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
