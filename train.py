"""peftforge entry point.

    accelerate launch train.py --config configs/smollm2-lora.yaml train.max_steps=200
    python train.py --config configs/tiny-lora.yaml
    python train.py export --run runs/x --merge --out merged/
"""
import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
