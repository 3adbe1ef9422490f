"""Retrieval metrics as the revisited Oxford/Paris benchmark defines them, and ground-truth formats.

A query's ground truth is (positives, junk). Junk images are removed from the ranking before
positives are located; AP is the trapezoidal area under the precision-recall curve, as in the
revisited benchmark's evaluation code; mAP is the mean over queries that have positives. The
query's own image, when it is in the database, is always junk. Ties in score keep database order.
"""

from __future__ import annotations

import csv
import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np

PROTOCOLS = ("easy", "medium", "hard")


@dataclass(frozen=True)
class Query:
    """One query: its image and, per protocol, which database images are positive or ignored."""

    image: str  # image name (matched to a store's image_id or URI stem)
    positives: dict[str, frozenset[str]]  # protocol -> names
    junk: dict[str, frozenset[str]]


def average_precision(positive_ranks: Sequence[int], positives: int) -> float:
    """Trapezoidal AP from the 0-based ranks (junk removed) of the retrieved positives."""
    ap = 0.0
    for found, rank in enumerate(sorted(positive_ranks)):
        precision_before = 1.0 if rank == 0 else found / rank
        precision_at = (found + 1) / (rank + 1)
        ap += (precision_before + precision_at) / (2 * positives)
    return ap


def ranks_without_junk(ranking: Sequence[str], positives: frozenset[str], junk: frozenset[str]) -> list[int]:
    """0-based positions of positives in `ranking` once junk images are taken out of it."""
    ranks, skipped = [], 0
    for position, name in enumerate(ranking):
        if name in junk:
            skipped += 1
        elif name in positives:
            ranks.append(position - skipped)
    return ranks


def evaluate(rankings: dict[str, list[str]], queries: Sequence[Query], ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Per protocol: mAP and recall@k (share of queries with a positive in the top k), over queries
    that have positives; also how many queries counted."""
    protocols = sorted({p for q in queries for p in q.positives}, key=lambda p: (PROTOCOLS + (p,)).index(p))
    results = {}
    for protocol in protocols:
        aps, hits = [], {k: 0 for k in ks}
        for query in queries:
            positives = query.positives[protocol] - {query.image}
            if not positives:
                continue
            junk = query.junk[protocol] | {query.image}
            ranks = ranks_without_junk(rankings[query.image], positives, junk)
            aps.append(average_precision(ranks, len(positives)))
            for k in ks:
                hits[k] += bool(ranks) and min(ranks) < k
        counted = len(aps)
        results[protocol] = {"mAP": float(np.mean(aps)) if aps else float("nan"), "queries": counted}
        results[protocol].update({f"recall@{k}": hits[k] / counted if counted else float("nan") for k in ks})
    return results


def named_by(queries: Sequence[Query], find: Callable[[str], str], where: str) -> list[Query]:
    """The ground truth with every name replaced by the image_id `find` gives it (a store's
    `FeatureStore.find`: image_id, URI, file name or its stem, as every command names an image).
    Names that match no image, or several, are refused together: a misspelt positive would
    otherwise count as one never found."""
    names = {q.image for q in queries} | {name for q in queries for group in (*q.positives.values(), *q.junk.values()) for name in group}
    ids, unknown = {}, []
    for name in sorted(names):
        try:
            ids[name] = find(name)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} names of the ground truth are not images of {where} (or name several), e.g. {unknown[:5]}")

    def renamed(groups: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
        return {protocol: frozenset(ids[name] for name in group) for protocol, group in groups.items()}

    return [Query(ids[q.image], renamed(q.positives), renamed(q.junk)) for q in queries]


def check_names(queries: Sequence[Query], known: set[str], where: str) -> None:
    """Every positive and junk image must be in the ranked database (an ok image): one that is
    not would silently count as a positive never found."""
    named = {name for q in queries for group in (*q.positives.values(), *q.junk.values()) for name in group}
    if unknown := sorted(named - known):
        raise ValueError(f"{len(unknown)} names of the ground truth are not ok images of {where}, e.g. {unknown[:5]}")


def rank_database(scores: np.ndarray, names: Sequence[str]) -> list[str]:
    """Names by decreasing score; equal scores keep database order."""
    order = np.argsort(-scores, kind="stable")
    return [names[i] for i in order]


# ---------------------------------------------------------------------------- ground truth


def load_ground_truth(uri: str, storage_options: dict | None = None) -> list[Query]:
    """A revisited Oxford/Paris pickle (`gnd_roxford5k.pkl`: imlist, qimlist, gnd with easy/hard/junk)
    or a CSV with columns query, positives (space-separated names), and optional junk."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
        raw = handle.read()
    if uri.endswith(".pkl"):
        return _revisited(pickle.loads(raw))
    return _csv(raw.decode(), uri)


def _revisited(data: dict) -> list[Query]:
    images = data["imlist"]
    queries = []
    for name, truth in zip(data["qimlist"], data["gnd"]):
        easy = frozenset(images[i] for i in truth["easy"])
        hard = frozenset(images[i] for i in truth["hard"])
        junk = frozenset(images[i] for i in truth["junk"])
        queries.append(
            Query(
                image=name,
                positives={"easy": easy, "medium": easy | hard, "hard": hard},
                junk={"easy": junk | hard, "medium": junk, "hard": junk | easy},
            )
        )
    return queries


def _csv(text: str, uri: str) -> list[Query]:
    reader = csv.DictReader(io.StringIO(text))
    if not {"query", "positives"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{uri}: a ground-truth CSV has the columns query, positives (space-separated names) and optionally junk; found {reader.fieldnames}")
    queries = []
    for row in reader:
        positives = frozenset(row["positives"].split())
        junk = frozenset((row.get("junk") or "").split())
        queries.append(Query(image=row["query"].strip(), positives={"all": positives}, junk={"all": junk}))
    return queries
