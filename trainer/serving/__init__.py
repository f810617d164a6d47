"""Co-serving: answer inference requests while a PEFT fine-tuning job trains, in the same engine
iterations, behind an OpenAI-compatible API (`python train.py serve`).

The engine (request state, scheduler, batches, KV caches, the fine-tuning share of each iteration,
adapter versions) is separate from the HTTP layer (`api.py`), which only talks to it through
thread-safe calls. Importing this package is light: the config schema (`config.py`) is read by
`trainer.config` for every run.
"""
