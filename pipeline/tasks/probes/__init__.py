"""Probes: linear depth and segmentation heads trained on stored features and scored side by side.

    config   the probe job's config and every check made before training
    heads    DINOv2-style linear dense heads, depth bins, SigLoss, maps onto original pixels
    probe    streaming training with checkpoints, scoring, output ensembling
    metrics  depth metrics (the NYU toolbox's) and mIoU / aAcc (mmsegmentation's)

May import: the store, the engine, extraction, `tasks.shared`.
"""
