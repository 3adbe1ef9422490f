"""The SRT engine: a frozen timm ViT run on sub-token shifts of each image, aggregated exactly.

    shifts       shift sets: grid, random draws from the sub-token lattice, explicit lists, batches
    aggregation  the exact separable aggregation: views, token grids mapped back, partial sums
    srt          `SRT`: shift ensembles (whole, adaptive, output-space), partial sums that add up
    reference    the naive full-resolution chain the engine is tested and benchmarked against
    models       timm ViTs built from bytes or the hub; taps of blocks and attention keys
    positions    position tables at other grid sizes, resized as each model family's code resizes them
    accelerator  CPU vs CUDA: autocast dtype, views per forward pass fitted to memory, pinned uploads
    pca          a PCA basis of dense maps, projection and the way back

May import: torch, timm, numpy, safetensors; never Ray, fsspec, zarr or Arrow, and no other
package of the pipeline (pyproject.toml: import contracts). The engine knows no files: a
checkpoint reaches it as bytes.
"""
