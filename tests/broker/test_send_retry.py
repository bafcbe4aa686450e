"""A send whose kombu channel is closed under it is sent again (found by the soak, issue #27).

When Redis restarts, the API thread that reconnects closes every channel of the shared connection; another
thread about to publish on one of them failed inside kombu's Redis transport with `AttributeError:
'NoneType' object has no attribute 'client'`, and `POST /jobs` answered 500. Here the channel is closed
exactly there (as that other thread does), on real Redis; the message must still arrive, once.
"""
from __future__ import annotations

import base64
import json

import pytest
import redis
from kombu.transport import redis as kombu_redis

from core.settings import reset_settings

pytestmark = [pytest.mark.redis]


def _queued_job_ids(r: redis.Redis, queue: str) -> list[int]:
    out = []
    for raw in r.lrange(queue, 0, -1):
        msg = json.loads(raw)
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        out.append(json.loads(body)[0][0])
    return out


def test_a_channel_closed_under_a_send_is_sent_again(redis_url, monkeypatch):
    monkeypatch.setenv("BROKER_URL", redis_url)
    reset_settings()
    import broker.app
    create_client = kombu_redis.Channel._create_client
    closed: list[int] = []

    def closed_under_the_send(self, *args, **kwargs):
        if not closed:  # the first send only: another thread's reconnect closes this channel right now
            closed.append(1)
            self.close()
        return create_client(self, *args, **kwargs)
    monkeypatch.setattr(kombu_redis.Channel, "_create_client", closed_under_the_send)
    try:
        broker.app.enqueue(4242, "noop", "cpu")
    finally:
        reset_settings()
    assert closed == [1]
    assert _queued_job_ids(redis.Redis.from_url(redis_url), "cpu") == [4242]
