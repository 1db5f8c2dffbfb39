#!/usr/bin/env python3
"""Train a timm model with a self-knowledge-distillation method: `python train.py --selfkd dlb ...`."""
from timm_selfkd.train import main

if __name__ == '__main__':
    main()
