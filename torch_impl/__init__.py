"""PyTorch implementation: streaming engine, ResNet trunk, CLAM head, slide reading, training."""
