"""Federated fine-tuning on Flower: Ferret (seeds and coefficients) or FedAvg / FedIT (weights).

Modules, from the maths out: `ferret` (projection and reconstruction, plain torch), `partition`
(clients' data), `params` (the flat vector of travelling weights), `setup` (what server and
clients build alike), `wire` (message payloads and their bytes), `client`, `strategy`, `server`,
`checkpoint`, `apps` (the Flower ServerApp/ClientApp), `simulation` (`train.py federated`).
`config` holds the `federated:` schema and is the only module trainer.config imports.
"""
