"""Using a finished run: `train.py eval` (its metrics on held-out or new data) and `train.py predict`
(an answer, label or ranking per row). Both open the run with trainer.inference.run and reuse the
trainer's own config, data, task, model and evaluation code, so a run is judged exactly as it
was trained and evaluated.
"""
