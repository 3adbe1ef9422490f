"""SRT feature extraction: source -> decode -> SRT -> store -> manifest, then the tasks that read stores.

One subpackage per concern, each importing only those below it (pyproject.toml: import contracts):

    commands    the command-line jobs (srt-* console scripts; jobs/*.py run them from a checkout)
    tasks       retrieval, segmentation, probes, discovery, distillation, pictures: readers of stores
    extraction  sources and plans, decoding, the job config, the shard worker, local and Ray runners
    store       the Zarr v3 feature store, its manifests and reader, URIs through fsspec
    engine      the SRT math and the timm ViTs it runs, pure torch

Each package's `__init__` lists its modules and what it may import.
"""

__version__ = "0.1.0"
