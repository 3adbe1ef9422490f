"""Retrieval: descriptors of stored images, FAISS indexes over a store, rankings and their metrics.

    index    descriptors (cls, pooled, GeM), index build / incremental add / save / load, queries
    ranking  AP, mAP, recall@k (revisited Oxford/Paris protocol), ground-truth formats

May import: the store, the engine, extraction (query images run the store's model).
"""
