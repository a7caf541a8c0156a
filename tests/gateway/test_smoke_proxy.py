from __future__ import annotations


def test_chat_round_trip(http, upstream, operator_headers):
    r = http.post("/vx11/route/chat", json={"prompt": "hi"}, headers=operator_headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-vx11-intent"] == "chat"
    assert upstream.seen[-1].path == "/switch/route-v5"
