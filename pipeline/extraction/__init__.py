"""Extraction: sources and plans, decoding, the job config, the shard worker, the in-process and Ray runners, Ray Data interop."""
