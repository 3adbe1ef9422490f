"""What more than one task family uses.

    tokencut      TokenCut's normalized cut of a feature map (saliency and object discovery)
    ground_truth  ground truth of a store's images: depth and label maps, VOC / CSV boxes
    training      seeded batch streams, checkpoints, Ray Train workers (probes and distillation)

May import: the store, the engine, extraction; never a task family.
"""
