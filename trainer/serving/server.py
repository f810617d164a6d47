"""`python train.py serve --config X.yaml [key=value ...]`: one process, one base model, the
OpenAI-compatible API, and co-served fine-tuning.

Start-up order: the config, the model and the user adapters, the engine thread, the job records of
earlier runs and the config's own job (all validated before anything binds, so a bad config exits
2 with one line), then uvicorn on a socket bound here (so the port is known and printed, even for
`serving.port=0`). Shutdown (SIGINT/SIGTERM): uvicorn stops accepting and gives requests in flight
`serving.shutdown_timeout_s` to finish; then the engine fails what is left with a clean 503,
checkpoints the fine-tuning job (it resumes when the server starts again) and stops.
"""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from pathlib import Path

from trainer.config import Config, load_config
from trainer.errors import UserError

log = logging.getLogger("trainer.serving")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py serve", description="serve the base model, its LoRA adapters and "
                                "co-served fine-tuning jobs behind an OpenAI-compatible API")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/serve-smollm2.yaml")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. serving.port=8000")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    return serve(cfg)


def base_model_id(cfg: Config) -> str:
    if cfg.serving.model_name:
        return cfg.serving.model_name
    spec = cfg.model.name_or_path
    if spec.startswith(("packaged:", "tiny:")):
        return spec.replace("packaged:", "").replace("tiny:", "tiny-")
    path = Path(spec).expanduser()
    return path.resolve().name if path.exists() else spec


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "pick another serving.port (0: any free port)" if exc.errno == errno.EADDRINUSE else None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}", where="serving.host/serving.port",
                        hint=hint) from None
    sock.listen(128)
    return sock


def load_served_model(model_cfg, tokenizer):
    """The base model as the server holds it, in eval mode. Unless `model.attn_implementation` is
    set, with the attention the training loop gives padding-free batches (trainer.varlen_attention:
    decoding and prefill, which carry a cache or a padding mask, run transformers' SDPA unchanged),
    so that a co-served job's whole micro-batches run padding-free, as in `train_step`."""
    from trainer.models import load_model
    from trainer.varlen_attention import packed_attention

    if model_cfg.attn_implementation is None:
        model_cfg = model_cfg.model_copy(update={"attn_implementation": packed_attention()})
    return load_model(model_cfg, tokenizer).eval()


def serve(cfg: Config) -> int:
    import torch
    import uvicorn

    from trainer.models import load_tokenizer
    from trainer.serving import lora
    from trainer.serving.api import create_app
    from trainer.serving.engine import Engine
    from trainer.serving.jobs import JobManager
    from trainer.serving.metrics import Metrics
    from trainer.serving.registry import Registry

    s = cfg.serving
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.model.task != "causal_lm":
        raise UserError("the server generates text: it needs model.task=causal_lm", where="model.task")
    if s.threads:
        torch.set_num_threads(s.threads)
    # the engine, the HTTP layer and the job worker each tokenize on their own thread
    tokenizer, api_tokenizer, jobs_tokenizer = (load_tokenizer(cfg.model) for _ in range(3))
    for name, path in s.adapters.items():  # before seconds of model loading: a wrong folder is a typo
        lora.check_lora_folder(path, where=f"serving.adapters.{name}")
    model = load_served_model(cfg.model, tokenizer)
    registry = Registry(base_model_id(cfg))
    for i, (name, path) in enumerate(s.adapters.items()):
        internal = f"user_{i}"
        model = lora.load_adapter(model, path, internal, where=f"serving.adapters.{name}")
        registry.add_adapter(name, internal)
    positions = getattr(model.config, "max_position_embeddings", None) or 4096
    max_model_len = s.max_model_len or min(positions, 4096)
    if max_model_len > positions:
        raise UserError(f"the model has {positions} positions", where="serving.max_model_len")
    sock = _bind(s.host, s.port)  # before the engine starts: a taken port is a user error, exit 2

    metrics = Metrics()
    engine = Engine(model, tokenizer, registry, s, metrics=metrics)
    metrics.watch(engine)
    engine.start()
    jobs = JobManager(cfg, engine, registry, jobs_tokenizer)
    try:
        jobs.restore()
        if s.finetune:
            jobs.add_config_job()
    except BaseException:
        engine.stop(timeout=0)
        sock.close()
        raise
    jobs.start()

    app = create_app(engine, registry, jobs, metrics, api_tokenizer, s, max_model_len)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=s.shutdown_timeout_s,
                                           access_log=False))
    # uvicorn handles SIGINT/SIGTERM while it runs, then restores the handlers found and raises the
    # signal again; with the default handlers that kills the process before the engine stops and the
    # job checkpoints. Found handlers that only ask uvicorn to exit make the re-raise harmless.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
    host, port = sock.getsockname()[:2]
    print(f"peftforge: serving {registry.base_id} on http://{host}:{port} "
          f"(models: {', '.join(c['id'] for c in registry.cards())})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        jobs.stop()
        engine.stop(timeout=0)  # uvicorn already waited for requests in flight
        sock.close()
        print("peftforge: stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - use train.py serve
    sys.exit(main(sys.argv[1:]))
