"""The Redis store against a real redis-server: the script, shared limits, tokens, budgets."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from gateway.store.base import Counter, StoreError, Verdict
from gateway.store.memory import MemoryStore
from gateway.store.redis import MAX_GROUPS, RedisStore, script_args
from gateway.store.script import LIMIT_SCRIPT
from tests.integration.test_ratelimit import ENV, chat, token
from tests.procs import Gateway, MockLLM
from tests.redis_procs import RedisServer, redis_server

__all__ = ["redis_server"]  # the module-scoped fixture

StartGateway = Callable[..., Gateway]
T0 = 1_800_000_000_000
DAY = 86_400_000


def random_batch(
    rnd: random.Random, tag: str, slot: Callable[[int], int], amounts: list[int]
) -> list[Counter]:
    """One to four counters over a few keys (``slot`` picks the k-th counter's key), with
    random periods, limits and ``amounts``; a few fixed windows."""
    batch = []
    for k in range(rnd.randint(1, 4)):
        period = rnd.choice([1000, 2000, 60_000])
        fixed = rnd.random() < 0.15
        key = f"{tag}:{{s{slot(k)}}}:{period}:{fixed}"
        limit, amount = rnd.choice([1, 3, 10, 50]), rnd.choice(amounts)
        batch.append(Counter(key, limit, period, amount, fixed))
    return batch


async def same_as_memory(url: str, tag: str, steps: int = 400) -> None:
    """Random batches, hits and settlements give the same answers in Redis and in memory."""
    rs, ms = RedisStore(url, 1.0), MemoryStore()
    rnd = random.Random(tag)
    now = T0
    try:
        for _ in range(steps):
            now += rnd.choice([1, 7, 60, 333, 999, 2500])
            rs.now = now
            batch = random_batch(rnd, tag, lambda k: k % 3, [1, 1, 2, 5])
            if rnd.random() < 0.2:
                fixes = [Counter(c.key, c.limit, c.period_ms, rnd.randint(-6, 6), c.fixed)
                         for c in batch]  # fmt: skip
                await rs.add(fixes)
                ms.add_now(fixes, now)
                continue
            theirs, ours = await rs.hit(batch), ms.hit_now(batch, now)
            assert (theirs.allowed, theirs.failed, theirs.remaining) == (
                ours.allowed,
                ours.failed,
                ours.remaining,
            )
            if not rs.cluster:
                assert theirs.reset_ms == ours.reset_ms
    finally:
        await rs.close()


def test_script_gives_the_memory_store_answers(redis_server: RedisServer) -> None:
    asyncio.run(same_as_memory(redis_server.url, "eq"))


async def shared_calls_as_memory(url: str, tag: str, steps: int = 150) -> int:
    """Random requests of one loop turn, decided in shared script calls, get the answers the
    memory store gives them one after the other in the same order."""
    rs, ms = RedisStore(url, 1.0), MemoryStore()
    rnd = random.Random(tag)
    now, decided = T0, 0
    try:
        for _ in range(steps):
            now += rnd.choice([1, 7, 60, 333, 999, 2500])
            rs.now = now
            batches = [
                random_batch(rnd, tag, lambda _: rnd.randint(0, 3), [0, 1, 1, 2, 5])
                for _ in range(rnd.randint(1, 12))
            ]
            theirs = await asyncio.gather(*(rs.hit(b) for b in batches))
            for batch, verdict in zip(batches, theirs, strict=True):
                ours = ms.hit_now(batch, now)
                assert verdict == ours, (batch, verdict, ours)
                decided += 1
    finally:
        await rs.close()
    return decided


def test_shared_calls_give_the_memory_store_answers(redis_server: RedisServer) -> None:
    assert asyncio.run(shared_calls_as_memory(redis_server.url, "shared")) > 500


def test_batches_of_one_loop_turn_share_a_call_with_sequential_answers(
    redis_server: RedisServer,
) -> None:
    """Concurrent requests' batches go in one script call (up to MAX_GROUPS a call), and
    each gets the answer it would have got alone, in the order they came."""
    calls_before = _evalsha_calls(redis_server)

    async def run() -> int:
        rs, ms = RedisStore(redis_server.url, 1.0), MemoryStore()
        rnd = random.Random("turns")
        now, calls = T0, 0
        try:
            await rs.ping()
            for _ in range(60):
                now += rnd.choice([1, 60, 999, 2500])
                rs.now = now
                batches = []
                for _ in range(rnd.choice([1, 2, 5, 31, 32, 33, 70])):
                    batch = []
                    for k in range(rnd.randint(1, 4)):
                        period = rnd.choice([1000, 60_000])
                        fixed = rnd.random() < 0.15
                        key = f"turn:{{s{k % 3}}}:{period}:{fixed}"
                        limit, amount = rnd.choice([3, 10, 50]), rnd.choice([1, 1, 2, 5])
                        batch.append(Counter(key, limit, period, amount, fixed))
                    batches.append(batch)
                theirs = await asyncio.gather(*(rs.hit(b) for b in batches))
                ours = [ms.hit_now(b, now) for b in batches]
                assert [(v.allowed, v.failed, v.remaining, v.reset_ms) for v in theirs] == [
                    (v.allowed, v.failed, v.remaining, v.reset_ms) for v in ours
                ]
                calls += -(-len(batches) // MAX_GROUPS)
        finally:
            await rs.close()
        return calls

    expected = asyncio.run(run())
    assert _evalsha_calls(redis_server) - calls_before == expected


def test_batches_sharing_a_call_all_fail_with_it() -> None:
    """When the shared call fails (nothing listens), every batch that joined it gets a
    StoreError; none is left waiting."""

    async def run() -> list[BaseException | Verdict]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: connections are refused
        rs = RedisStore(f"redis://127.0.0.1:{port}", 0.5)
        try:
            hits = (rs.hit([Counter(f"down:{{s{i}}}", 5, 1000)]) for i in range(5))
            return await asyncio.wait_for(asyncio.gather(*hits, return_exceptions=True), 5)
        finally:
            await rs.close()

    outcomes = asyncio.run(run())
    assert len(outcomes) == 5 and all(isinstance(o, StoreError) for o in outcomes), outcomes


def test_lone_path_of_the_script_answers_as_the_batched_one(redis_server: RedisServer) -> None:
    """A lone request with a key per counter takes the script's lean path (``one``); the same
    requests on a copy of the keys through the batched path (with an empty second batch)
    get the same answers, leave the same counters and expiries, and the reply has no more
    than its counters' entries."""
    raw = redis.Redis.from_url(redis_server.url)
    sha = raw.script_load(LIMIT_SCRIPT)
    rnd = random.Random("lone")
    now, lean = T0, 0
    try:
        for _ in range(300):
            now += rnd.choice([1, 7, 60, 333, 999, 2500])
            n = rnd.randint(1, 6)
            picked = rnd.sample(range(8), n)
            batch = [
                Counter(f"{{s}}:{k}", rnd.choice([1, 3, 10, 50]), [1000, 2000, 60_000][k % 3],
                        rnd.choice([0, 1, 1, 2, 5]), k == 7)
                for k in picked
            ]  # fmt: skip
            keys, argv = script_args("hit", [batch], now)
            assert argv[0] == "one"
            lean += 1
            alone = raw.evalsha(sha, len(keys), *keys, *argv)
            copy = [c._replace(key="b" + c.key) for c in batch]
            keys, argv = script_args("hit", [copy, []], now)
            assert argv[0] == "hit"
            batched = raw.evalsha(sha, len(keys), *keys, *argv)
            assert alone == batched[: 2 + 2 * n], (batch, alone, batched)
            for c in batch:
                assert raw.hgetall(c.key) == raw.hgetall("b" + c.key)
                assert abs(raw.pttl(c.key) - raw.pttl("b" + c.key)) <= 50
        assert lean == 300
        twice = [Counter("{s}:x", 5, 1000), Counter("{s}:x", 9, 2000)]
        assert script_args("hit", [twice], now)[1][0] == "hit"  # a key twice: the slots path
        refund = [Counter("{s}:y", 5, 1000, -1)]
        assert script_args("hit", [refund], now)[1][0] == "hit"
    finally:
        raw.close()


def test_a_flushed_script_is_loaded_again(redis_server: RedisServer) -> None:
    """After ``SCRIPT FLUSH`` (as after a restart or a failover to a replica), a lone request
    and a shared call both answer: ``NOSCRIPT`` makes the client send the script itself."""
    raw = redis.Redis.from_url(redis_server.url)

    async def run() -> tuple[Verdict, list[Verdict]]:
        rs = RedisStore(redis_server.url, 1.0)
        try:
            rs.now = T0
            await rs.hit([Counter("flush:{a}:1", 5, 1000)])
            raw.script_flush()
            lone = await rs.hit([Counter("flush:{a}:1", 5, 1000), Counter("flush:{a}:2", 5, 1000)])
            raw.script_flush()
            shared = await asyncio.gather(
                *(rs.hit([Counter("flush:{a}:1", 5, 1000)]) for _ in range(3))
            )
            return lone, list(shared)
        finally:
            await rs.close()

    try:
        lone, shared = asyncio.run(run())
        assert lone.allowed and lone.remaining == [3, 4]
        assert [v.remaining for v in shared] == [[2], [1], [0]]
        assert raw.script_exists(hashlib.sha1(LIMIT_SCRIPT.encode()).hexdigest()) == [True]
    finally:
        raw.close()


def test_expiry_is_set_by_the_first_write_of_a_window(redis_server: RedisServer) -> None:
    async def run() -> None:
        rs = RedisStore(redis_server.url, 1.0)
        raw = redis.Redis.from_url(redis_server.url)
        sliding = Counter("ttl:{a}:r60000", 10, 60_000, 1, False)
        fixed = Counter("ttl:{a}:b", 10, DAY, 1, True)
        try:
            rs.now = T0 + 1_000
            assert (await rs.hit([sliding, fixed])).allowed
            assert 119_000 < raw.pttl(sliding.key) <= 120_000
            until_midnight = DAY - (T0 + 1_000) % DAY
            assert until_midnight < raw.pttl(fixed.key) <= until_midnight + 60_000
            raw.pexpire(sliding.key, 30_000)  # stands for time gone by in this window
            rs.now = T0 + 2_000
            assert (await rs.hit([sliding])).allowed
            assert raw.pttl(sliding.key) <= 30_000  # same window: left as it was
            rs.now = T0 + 61_000  # the next window: its first write sets it again
            verdict = await rs.hit([sliding])
            assert verdict.allowed and verdict.remaining == [10 - 1 - 2 * 59 // 60]
            assert raw.pttl(sliding.key) > 119_000
        finally:
            raw.close()
            await rs.close()

    asyncio.run(run())


def test_budget_resets_on_the_next_utc_day(redis_server: RedisServer) -> None:
    async def run() -> list[Verdict]:
        rs = RedisStore(redis_server.url, 1.0)
        midnight = (T0 // DAY + 1) * DAY
        out = []
        for at in (midnight - 2000, midnight - 1000, midnight + 1):
            rs.now = at
            out.append(await rs.hit([Counter("budget:{u:z}", 100, DAY, 60, fixed=True)]))
        await rs.close()
        return out

    spent, refused, next_day = asyncio.run(run())
    assert spent.allowed and spent.remaining == [40]
    assert not refused.allowed and refused.reset_ms == [1000]
    assert next_day.allowed and next_day.remaining == [40]


def _wait_past_midnight() -> None:
    """Day windows roll at 00:00 UTC; keep a test from straddling that."""
    left = 86400 - time.time() % 86400
    if left < 15:
        time.sleep(left + 0.1)


def test_two_gateways_enforce_one_global_limit(
    start_gateway: StartGateway, mock_llm: MockLLM, redis_server: RedisServer
) -> None:
    policy = (
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{redis_server.url}", key_prefix: two, timeout: 500ms}}\n'
        "rate_limits: {per_ip: 40/day, per_route: 1000/day}\n"
    )
    gws = [start_gateway(policy, mock_llm.url, name=f"p{i}.yaml") for i in range(2)]
    _wait_past_midnight()

    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: client.get(f"{gws[i % 2].url}/echo/{i}").status_code,
                              range(100)))  # fmt: skip
    assert codes.count(200) == 40 and codes.count(429) == 60
    assert sum(gw.metric("gateway_ratelimit_rejections_total", {"scope": "ip"}) for gw in gws) == 60
    assert redis_server.cli("HGET", "two:{r:other}:r86400000", "c") == "40"


def _settled(server: RedisServer, key: str, want: int) -> str:
    deadline = time.monotonic() + 5
    value = server.cli("HGET", key, "c")
    while value != str(want) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = server.cli("HGET", key, "c")
    return value


def test_token_reservations_settle_to_the_real_usage(
    start_gateway: StartGateway, mock_llm: MockLLM, redis_server: RedisServer
) -> None:
    gw = start_gateway(
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{redis_server.url}", key_prefix: tok}}\n'
        "auth: {secret: {env: RL_TEST_SECRET}}\n"
        "rate_limits: {tokens_per_tier: {free: 100000/day}}\n",
        mock_llm.url,
        env=ENV,
    )
    _wait_past_midnight()
    url, key = f"{gw.url}/v1/chat/completions", "tok:{u:erin}:*:t86400000"
    headers = token("erin", "free")
    resp = httpx.post(url, json=chat(30, 500), headers=headers)
    used = resp.json()["usage"]["total_tokens"]
    assert _settled(redis_server, key, used) == str(used)  # not the 500+ reserved
    total = used
    with httpx.stream("POST", url, json=chat(12, 7, stream=True), headers=headers) as stream:
        body = b"".join(stream.iter_bytes())
    assert b'"usage":{"prompt_tokens"' in body
    total += 12 + 7
    assert _settled(redis_server, key, total) == str(total)
    without = chat(5, 9, stream=True)
    del without["stream_options"]  # the gateway asks for usage itself, and hides it again
    with httpx.stream("POST", url, json=without, headers=headers) as stream:
        body = b"".join(stream.iter_bytes())
    assert b'"prompt_tokens"' not in body and body.rstrip().endswith(b"data: [DONE]")
    total += 5 + 6  # "Echo:" and the five words: the real usage, not the estimate
    assert _settled(redis_server, key, total) == str(total)


def _evalsha_calls(server: RedisServer) -> int:
    for line in server.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_full_counters_refuse_locally_until_they_reset(
    start_gateway: StartGateway, mock_llm: MockLLM, redis_server: RedisServer
) -> None:
    policy = (
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{redis_server.url}", key_prefix: full, timeout: 500ms}}\n'
        "rate_limits: {per_ip: 3/day}\n"
    )
    gw = start_gateway(policy, mock_llm.url)
    _wait_past_midnight()
    before = _evalsha_calls(redis_server)
    with httpx.Client(base_url=gw.url) as client:
        answers = [client.get("/echo/x") for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 3 + [429] * 7
    # 3 admitted and the first refusal went to Redis; the other 6 were refused locally...
    assert _evalsha_calls(redis_server) - before == 4
    assert gw.metric("gateway_cache_requests_total", {"cache": "over_limit", "result": "hit"}) == 6
    # ...with the same answer: the wait until the counter has room again.
    waits = {int(a.headers["retry-after"]) for a in answers[3:]}
    assert len(waits) <= 2 and min(waits) > 60, waits  # a day-long window: hours, not seconds
    assert all(a.json()["error"]["scope"] == "ip" for a in answers[3:])
