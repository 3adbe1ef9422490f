"""Probes: linear depth and segmentation heads on stored features, their metrics."""
