"""Segmentation: label propagation and DAVIS, TokenCut saliency, their metrics."""
