"""Retrieval: descriptors and FAISS indexes over a store, rankings and their metrics."""
