"""Self-distillation: a copy of the ViT fine-tuned so its plain tokens match a store's SRT features.

    distill  config, data from a store, the training loop, the final student and its sidecar

May import: the store, the engine, extraction, `tasks.shared`.
"""
