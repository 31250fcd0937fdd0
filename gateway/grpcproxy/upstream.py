"""The channel to the gRPC upstream: TLS or plaintext, rebuilt when its certificates change.

A rebuilt channel serves new calls at once; the old one closes after ``drain`` seconds, so
calls already on it finish (longer streams are cancelled then, and the client sees
``CANCELLED``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from gateway.grpcproxy.tls import CertError, ClientFiles, client_paths, fingerprint
from gateway.policy.sections import GrpcConfig

log = logging.getLogger("gateway.grpc.upstream")

StreamCallable = grpc.aio.StreamStreamMultiCallable[bytes, bytes]
UnaryCallable = grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
MAX_CACHED_METHODS = 1024


def channel_options(cfg: GrpcConfig) -> list[tuple[str, Any]]:
    """Options of the upstream channel."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # The upstream is in the pod: when it restarts, find it again within a second or so
        # instead of grpc's default back-off of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.primary_user_agent", "gateway"),
        # Connections of its own: a channel rebuilt with new certificates must not pick up
        # a connection of the old one from grpc's process-wide pool.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if cfg.upstream_tls is not None and cfg.upstream_tls.server_name:
        opts.append(("grpc.ssl_target_name_override", cfg.upstream_tls.server_name))
    return opts


class UpstreamChannel:
    """The current channel and a cache of its per-method callables."""

    def __init__(self, cfg: GrpcConfig, drain: float) -> None:
        self.cfg = cfg
        self.drain = drain
        tls = cfg.upstream_tls
        self.paths = client_paths(tls) if tls is not None else ()
        self._seen = fingerprint(self.paths)
        self.files = ClientFiles.load(tls) if tls is not None else None
        self.channel = self._open()
        self._methods: dict[str, StreamCallable] = {}
        self._unary: dict[str, UnaryCallable] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.reloads = 0

    def _open(self) -> grpc.aio.Channel:
        opts = channel_options(self.cfg)
        if self.files is None:
            return grpc.aio.insecure_channel(self.cfg.upstream, options=opts)
        return grpc.aio.secure_channel(self.cfg.upstream, self.files.credentials(), options=opts)

    def method(self, name: str) -> StreamCallable:
        """The raw-bytes stream-stream callable for ``name`` (any of the four call kinds)."""
        found = self._methods.get(name)
        if found is None:
            # No (de)serializers: messages pass as the bytes they arrived as.
            found = self.channel.stream_stream(name)
            if len(self._methods) < MAX_CACHED_METHODS:
                self._methods[name] = found
        return found

    def unary_method(self, name: str) -> UnaryCallable:
        """The raw-bytes unary-stream callable for ``name``, for calls whose client sent one
        message and half-closed (unary and server-streaming calls)."""
        found = self._unary.get(name)
        if found is None:
            found = self.channel.unary_stream(name)
            if len(self._unary) < MAX_CACHED_METHODS:
                self._unary[name] = found
        return found

    async def ready(self, wait: float = 1.0) -> bool:
        """True when the channel is connected, or connects within ``wait`` seconds."""
        state = self.channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return True
        try:
            await asyncio.wait_for(self.channel.channel_ready(), wait)
        except (TimeoutError, grpc.aio.UsageError):
            return False
        return True

    def check_files(self) -> bool:
        """Rebuild the channel when the certificate files changed; True when it did."""
        tls = self.cfg.upstream_tls
        if tls is None:
            return False
        seen = fingerprint(self.paths)
        if seen == self._seen:
            return False
        try:
            files = ClientFiles.load(tls)
        except CertError as exc:
            log.warning("new upstream certificates not usable yet: %s", exc)
            return False
        self._seen = seen
        if files == self.files:
            return False
        self.files = files
        old, self.channel = self.channel, self._open()
        self._methods = {}
        self._unary = {}
        self.reloads += 1
        task = asyncio.get_running_loop().create_task(old.close(self.drain))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.info("upstream certificates reloaded", extra={"paths": list(self.paths)})
        return True

    async def watch(self, interval: float) -> None:
        """Check the certificate files every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.check_files()
            except Exception:
                log.exception("checking the upstream certificates failed")

    async def close(self, grace: float | None) -> None:
        """Close the channel (and any still closing), letting calls finish for ``grace``."""
        await self.channel.close(grace)
        for task in list(self._closing):
            task.cancel()
