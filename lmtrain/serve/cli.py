"""`lmtrain serve`: an OpenAI-compatible HTTP server for a WORKDIR or a Hugging Face directory.

Launch:  lmtrain serve WORKDIR --api-keys keys.txt --host 0.0.0.0 --port 8000
The model loads as `lmtrain generate` loads it; every program is compiled before the port opens, so the
first request is as fast as the rest. SIGTERM (or Ctrl-C) stops taking connections, lets the requests in
flight finish, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import pathlib
import signal
import sys
import time

import uvicorn

from lmtrain.generate import _Tokenizer, load_model, model_labels
from lmtrain.interop.hf_export import end_of_turn_tokens, workdir_chat_template
from lmtrain.model.decode import GenerationError
from lmtrain.paths import as_path, local_dir
from lmtrain.serve.app import ServedModel, Settings, create_app
from lmtrain.serve.auth import ENV_VAR, KeyCheck, ServeError, check_bind, load_keys
from lmtrain.serve.engine import Classifier, Engine
from lmtrain.serve.metrics import Metrics


class _DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown (stop listening, let open requests finish), with two changes: the app is
    told first, so that requests on kept-alive connections get 503 instead of a new generation; and the
    signal is not raised again afterwards, so the process exits 0 rather than dying by it."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.lmtrain_app = app

    def handle_exit(self, sig, frame) -> None:
        self.lmtrain_app.state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtrain serve", description="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("path", help="WORKDIR (its checkpoint, or the parameters `lmtrain import` wrote) or an HF dir")
    p.add_argument("--which", default="latest", help="checkpoint: 'latest', 'best' or a step number")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", metavar="FILE", help=f"file with one API key per line (else ${ENV_VAR})")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without keys")
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together in one wave")
    p.add_argument("--max-queue", type=int, default=64, help="rows that may wait; past it requests get 429")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a wave waits for more requests")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="the most tokens one request may ask for")
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk (prompt width step); 0: max_seq_len / 8")
    p.add_argument("--access-log", action="store_true", help="log every request line (never headers or keys)")
    return p


def _check_args(args) -> None:
    for name in ("max_batch", "max_queue", "max_tokens_cap"):
        if getattr(args, name) < 1:
            raise ServeError(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1.")
    if args.batch_wait_ms < 0 or args.chunk < 0:
        raise ServeError("--batch-wait-ms and --chunk: give 0 or a positive number.")
    if not 0 < args.port < 65536:
        raise ServeError(f"--port {args.port}: give a port in 1..65535.")


def load_served_model(args) -> tuple[ServedModel, object]:
    """The model as `lmtrain generate` loads it, with what the routes need to know of it."""
    which = int(args.which) if args.which.isdigit() else args.which
    model_def, params, tokenizer_dir = load_model(args.path, which)
    if tokenizer_dir is None:
        raise ServeError(f"{args.path} has no tokenizer; serving needs one to encode prompts.")
    with local_dir(tokenizer_dir) as local:
        tokenizer = _Tokenizer(pathlib.Path(local))
    head = model_def.cfg.head
    if head not in ("lm", "classify"):
        raise ServeError(f"{args.path} has a '{head}' head; lmtrain serve runs language models and classifiers.")
    template = workdir_chat_template(args.path) or tokenizer.chat_template
    ends = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    ends |= {tokenizer.token_id(t) for t in end_of_turn_tokens(template, tokenizer.token_id)}
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    name = args.model_name or as_path(args.path).name
    labels = model_labels(args.path, model_def.cfg.num_labels) if head == "classify" else None
    served = ServedModel(name, model_def, tokenizer, pad_id, frozenset(ends), template, labels,
                         min(args.max_tokens_cap, model_def.cfg.max_seq_len))
    return served, params


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _check_args(args)
        keys = load_keys(args.api_keys)
        check_bind(args.host, keys, args.insecure_no_auth)
        model, params = load_served_model(args)
    except (ServeError, GenerationError, FileNotFoundError, ValueError) as e:
        print(f"lmtrain serve: error: {e}", file=sys.stderr)
        return 2
    if not keys:
        where = "on 127.0.0.1 only" if args.host in ("127.0.0.1", "localhost", "::1") else f"on {args.host}"
        print(f"lmtrain serve: no API keys (--api-keys FILE or ${ENV_VAR}): every route is open, serving {where}.",
              file=sys.stderr)
    metrics = Metrics()
    chunk = args.chunk or None
    engine = classifier = None
    start = time.perf_counter()
    if model.model_def.cfg.head == "lm":
        engine = Engine(model.model_def, params, pad_id=model.pad_id, max_batch=args.max_batch,
                        max_queue=args.max_queue, batch_wait=args.batch_wait_ms / 1000, chunk=chunk)
        engine.on_token = metrics.tokens.inc
        engine.warm_up()
        engine.start()
    else:
        classifier = Classifier(model.model_def, params, pad_id=model.pad_id, max_batch=args.max_batch, chunk=chunk)
        classifier.warm_up()
    app = create_app(model, engine, classifier, KeyCheck(keys), metrics, Settings(max_n=args.max_batch))
    app.state.ready = True
    print(f"lmtrain serve: {model.name} warmed up in {time.perf_counter() - start:.1f}s; serving on "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=args.access_log, log_level="info",
                            timeout_graceful_shutdown=120, lifespan="off")
    try:
        _DrainingServer(config, app).run()
    finally:
        if engine is not None:
            engine.stop()
    print("lmtrain serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
