"""peftforge trainer: config, models, data, the loop, checkpoints, tracking, export."""
