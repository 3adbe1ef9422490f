"""Tasks that read feature stores: retrieval, segmentation, probes, object discovery, distillation, pictures."""
