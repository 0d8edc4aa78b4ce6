"""A plain peer for `lmtrain bench-serve`: transformers' `generate` behind a minimal FastAPI app, one request at a
time (a lock), streaming /v1/completions as OpenAI does. The baseline `lmtrain serve` is measured against.

Run:  python tools/serve_peer_transformers.py HF_EXPORT_DIR --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class Completion(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = False
    ignore_eos: bool = False


class _TokenQueue(BaseStreamer):
    """Hands each new token id to the request (the first `put` is the prompt)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self):
        self.queue.put(None)


def build_app(directory: str, name: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    def run(body: Completion, streamer: _TokenQueue) -> None:
        ids = tokenizer(body.prompt, return_tensors="pt")
        eos = None if body.ignore_eos else tokenizer.eos_token_id
        with lock, torch.no_grad():
            model.generate(**ids, max_new_tokens=body.max_tokens, do_sample=False, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id or 0, streamer=streamer)

    @app.post("/v1/completions")
    async def completions(body: Completion):
        streamer = _TokenQueue()
        worker = threading.Thread(target=run, args=(body, streamer), daemon=True)
        worker.start()

        async def events():
            meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": name}
            tokens = []
            while (token := await asyncio.to_thread(streamer.queue.get)) is not None:
                tokens.append(token)
                text = tokenizer.decode([token])
                yield f"data: {json.dumps({**meta, 'choices': [{'index': 0, 'text': text, 'finish_reason': None}]})}\n\n"
            usage = {"prompt_tokens": 0, "completion_tokens": len(tokens), "total_tokens": len(tokens)}
            yield f"data: {json.dumps({**meta, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="a Hugging Face model directory (an `lmtrain export`)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--name", default="peer")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    uvicorn.run(build_app(args.directory, args.name), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
