"""The Flower apps: one ServerApp and one ClientApp for both of Flower's engines.

`train.py federated` builds them around an already-checked config and runs them in the
simulation engine (trainer.federated.simulation). `flwr run` (deployment: a SuperLink and one
SuperNode per client) loads the module-level `server_app` and `client_app` named in
pyproject.toml's `[tool.flwr.app.components]`; those read the config from the run config:
`config` (a YAML path, relative to the working directory or to the app) and `overrides`
(`key=value ...`, as on train.py's command line).
"""
from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

APP_DIR = Path(__file__).resolve().parents[2]


def config_from_context(context: Context):
    from trainer.config import load_config

    run_config = context.run_config
    path = Path(str(run_config.get("config", "")))
    if not path.is_absolute() and not path.exists() and (APP_DIR / path).exists():
        path = APP_DIR / path
    return load_config(path, shlex.split(str(run_config.get("overrides", ""))))


def make_server_app(server=None) -> ServerApp:
    """`server`: a prepared `trainer.federated.server.Server`; None reads the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from trainer.federated.server import prepare, serve

        serve(grid, server if server is not None else prepare(config_from_context(context)))

    return app


def make_client_app(cfg=None) -> ClientApp:
    """`cfg`: the run's Config; None reads the run config."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from trainer.federated.client import handle_train

        return handle_train(msg, context, cfg if cfg is not None else config_from_context(context))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from trainer.federated.client import handle_query

        return handle_query(msg, context, cfg if cfg is not None else config_from_context(context))

    return app


server_app = make_server_app()
client_app = make_client_app()
