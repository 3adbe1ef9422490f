"""Extraction: a dataset through source -> decode -> SRT -> store -> manifest, in-process or on Ray.

    listing      a dataset's inputs (files, globs, file lists, tars, Parquet), each listed into its items
    repeated_keys  keys more than one input gives, found in fixed memory and counted exactly
    planning     the plan made input by input (threads, or Ray tasks), listed on while shards compute
    appending    what --append adds to a plan, and what is gone from the dataset since
    reading      read the planned bytes: merged byte ranges, retries with backoff, prefetch
    images       decode, orient, resize and normalize; the pixel <-> feature-cell transform
    jpeg_library the library that decodes JPEGs into tensors: TorchCodec, else torchvision.io
    resample     Pillow's antialiased bicubic resize as torch ops, bit for bit, on any device
    device_decoding  a shard's JPEGs decoded in one batch on the model's device (--decoder device)
    weights      checkpoints named by URI, read into the engine's models; their provenance
    flags        config dataclasses as flags: parsers, config files, errors naming the flag
    presets      the paper's settings, one name per task
    config       the extraction job's typed config: validation, provenance, resume fingerprint
    shards       a work shard between the worker's steps: loaded inputs, arrays on the host, commit stats
    worker       one shard through read -> decode -> SRT -> store -> manifest
    runner       driver steps (checks before any cluster, plan, resume) and the in-process runner
    summary      what a run did and what its store holds: the printed summary, summary.json
    progress     the progress bar, and the Ray counter actors report image groups to
    placement    how many actors with what resources, fitted to the cluster or refused naming flags
    actor        the Ray extraction actor: one model, units read, computed and written in it
    units        the Ray runner's units of work: whole shards, shift batches, commits, and their state
    distributed  the Ray runner: actor pool, scheduler, split shifts, retries, stragglers
    raydata      SRT in Ray Data pipelines (`SRTPredictor`), a store as a Ray Dataset

May import: the engine, the store, Ray, fsspec; never tasks or commands.
"""
