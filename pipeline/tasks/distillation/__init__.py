"""Self-distillation: a student ViT trained toward a store's SRT features."""
