"""Segmentation from stored features: video label propagation (DAVIS) and salient regions (TokenCut).

    propagation  DINO's label propagation, pure torch, tiled to the window at any stride
    davis        the DAVIS-2017 layout; propagating and scoring videos from a store
    saliency     TokenCut masks of a store's images, ground-truth mask folders, scores
    metrics      DAVIS J and F, saliency maxF and IoU, as the official code computes them

May import: the store, the engine, extraction, `tasks.shared`.
"""
