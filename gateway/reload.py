"""Hot reload: build the whole new pipeline first, then swap one reference.

Triggers: a change of the policy file (polled by stat of the resolved path, which also sees
Kubernetes ConfigMap symlink swaps) and SIGHUP. A bad file keeps the old pipeline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from gateway.app import GatewayApp
from gateway.pipeline import Pipeline
from gateway.policy import PolicyError, load_policy
from gateway.policy.schema import Policy
from gateway.telemetry import metrics

log = logging.getLogger("gateway.reload")

PipelineBuilder = Callable[[Policy], Pipeline]


def _fingerprint(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap swap changes the target inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Reloader:
    """Watches the policy file and swaps the app's pipeline when a new valid policy appears."""

    def __init__(
        self, path: Path, app: GatewayApp, build: PipelineBuilder, interval: float = 1.0
    ) -> None:
        self.path = path
        self.app = app
        self.build = build
        self.interval = interval
        self._seen = _fingerprint(path)
        self._digest = self._read_digest()
        self._lock = asyncio.Lock()

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    async def watch(self) -> None:
        """Poll the file until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            seen = _fingerprint(self.path)
            if seen != self._seen:
                self._seen = seen
                if seen is None:
                    log.warning(
                        "policy file is gone; keeping the policy in use",
                        extra={"path": str(self.path)},
                    )
                    metrics.CONFIG_RELOADS.labels("failure").inc()
                    continue
                await self.reload(reason="file changed", only_if_changed=True)

    async def reload(self, reason: str, only_if_changed: bool = False) -> bool:
        """Load, build and swap; True when the new policy is in use."""
        async with self._lock:
            digest = self._read_digest()
            if only_if_changed and digest is not None and digest == self._digest:
                return False
            try:
                policy = load_policy(self.path)
                pipeline = self.build(policy)
            except PolicyError as exc:
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.error(
                    "policy reload failed; keeping the policy in use",
                    extra={"reason": reason, "problems": exc.problems},
                )
                return False
            except Exception as exc:
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.error(
                    "policy reload failed; keeping the policy in use",
                    extra={"reason": reason, "problems": [str(exc)]},
                )
                return False
            try:
                await pipeline.start()
            except Exception as exc:
                await pipeline.close()
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.error(
                    "new policy failed to start; keeping the policy in use",
                    extra={"reason": reason, "problems": [str(exc)]},
                )
                return False
            old = self.app.swap(pipeline)
            self._digest = digest
            metrics.CONFIG_RELOADS.labels("success").inc()
            metrics.POLICY_INFO.set(time.time())
            for key in ("listen", "admin_listen", "grpc"):
                if getattr(old.policy, key) != getattr(policy, key):
                    log.warning("a changed %s takes effect only after a restart", key)
            log.info("policy reloaded", extra={"reason": reason})
            return True
