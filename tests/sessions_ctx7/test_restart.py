"""Sessions survive a gateway restart: two processes, one database file."""

from __future__ import annotations

WRITE = """
import asyncio
from sessions_ctx7 import enrich

async def main():
    turn = await enrich.begin("client:1", b'{"message": "remember the python bug"}', "durable-1")
    await enrich.finish(turn, 200, "application/json", b'{"response": "noted"}')
    return turn.session_id

print(json.dumps(asyncio.run(main())))
"""

READ = """
import asyncio
import orjson
from sessions_ctx7 import enrich
from sessions_ctx7.models import Session

async def main():
    turn = await enrich.begin("client:1", b'{"message": "what was it?"}', "durable-1")
    return {"restarted": turn.restarted, "created": turn.created,
            "metadata": orjson.loads(turn.body)["metadata"]}

result = asyncio.run(main())
result["count"] = Session.objects.get(session_id="durable-1").message_count
print(json.dumps(result))
"""


def test_a_session_survives_a_restart(process):
    assert process.run(WRITE) == "durable-1"
    after = process.run(READ)  # a new interpreter: nothing in memory carries over
    assert after["created"] is False and after["restarted"] is False
    assert after["count"] == 3
    assert after["metadata"] == {
        "context_summary": "user: remember the python bug\nassistant: noted\nuser: what was it?",
        "topic": "code",
    }
