"""Start a chat with web search over Tether's WebSocket, print its progress, stop it.

Run against `make run`:  uv run python examples/ws_chat.py "How does Tether stop a search?"
"""

import json
import os
import sys

import trio
from trio_websocket import open_websocket_url

URL = os.environ.get("TETHER_WS_URL", "ws://127.0.0.1:8080/ws")
KEY = os.environ.get("TETHER_KEY")  # needed only when the server has TETHER_API_KEYS
STOP_AFTER_DELTAS = int(os.environ.get("STOP_AFTER_DELTAS", "8"))


async def main(question: str) -> None:
    headers = [("Authorization", f"Bearer {KEY}")] if KEY else []
    async with open_websocket_url(URL, extra_headers=headers) as ws:
        session = json.loads(await ws.get_message())
        print("session", session["session_id"])
        await ws.send_message(json.dumps({"type": "chat", "request": {
            "model": "local",
            "features": {"web_search": True},
            "messages": [{"role": "user", "content": question}],
        }}))
        deltas = 0
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == "task":
                task_id = message["task_id"]
                print("task", task_id)
                continue
            if message["type"] != "event":
                print(message)
                continue
            event = message["event"]
            kind, data = event["type"], event["data"]
            if kind == "status":
                print(f"[{event['seq']}] status: {data['description']}")
            elif kind == "source":
                print(f"[{event['seq']}] source [{data['index']}] {data['title']} {data['url']}")
            elif kind == "delta":
                print(f"[{event['seq']}] delta: {data['content']!r}")
                deltas += 1
                if deltas == STOP_AFTER_DELTAS:
                    await ws.send_message(json.dumps({"type": "stop", "task_id": task_id}))
            elif kind.startswith("task:") and kind not in ("task:queued", "task:started"):
                print(f"[{event['seq']}] {kind}: phase={data['phase']} "
                      f"reason={data['cancel_reason']} content={data['content']!r}")
                return


if __name__ == "__main__":
    trio.run(main, " ".join(sys.argv[1:]) or "What is structured concurrency?")
