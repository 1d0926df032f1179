"""Top-k over item vectors by inner product: exact by default, an approximate FAISS index
for large catalogues, persisted on disk so a fresh process loads it instead of building it.

``exact`` is ``torch.topk(matrix @ query)``: the answer, and fast enough below
``APPROX_THRESHOLD`` rows (~25 ms for 1M x 65 on one CPU core, ~180 ms for 1M x 384).
Above it, and only when FAISS is installed (``pip install 'polyrec[bench]'`` or
``faiss-cpu``), :func:`open_index` builds one of two FAISS indexes over the matrix, or
loads the one a previous process saved under ``directory``:

- ``kind="hnsw"`` (the default; search's unit vectors): ``IndexHNSWFlat``, a graph walked
  by inner product. Good on unit vectors (cosine); poor on maximum-inner-product keys
  whose norms and a bias column carry part of the score (a two-tower's retrieval keys:
  recall@10 0.76 at efSearch 2048 on 1M such keys).
- ``kind="ivf"`` (the Recommender's): ``IndexIVFFlat`` with inner product, ``nlist``
  k-means lists, of which the ``nprobe`` whose centres score best are scanned exactly.
  It handles maximum inner product well (recall@10 0.998-1.0 against exact on the same
  1M keys scanning an eighth of the lists, a few ms a query) and builds in seconds to
  a minute instead of minutes.

Index files are named by a key made of the caller's name (e.g. the model version), a
fingerprint of the vectors themselves (:func:`matrix_fingerprint`) and the build
settings, so an index is never used for other vectors: new vectors give a new key and a
new index. Without FAISS, below the threshold, or with ``backend="exact"``, search stays
exact.

An approximate index may miss some of the true top-k; its recall@10 against exact on
the benchmarks' vectors is in docs/benchmarks.md (benchmarks/serve.py for search's
HNSW, benchmarks/recommend_scale.py for the Recommender's IVF).
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from polyrec.store.vector_cache import beyond_newest, write_atomically

log = logging.getLogger("polyrec.search")

#: rows from which an approximate index is used (when FAISS is installed)
APPROX_THRESHOLD = 200_000
BACKENDS = ("auto", "exact", "faiss")
KINDS = ("hnsw", "ivf")
#: training points per IVF list: k-means on a sample of this many per list (FAISS warns
#: below 39), enough for stable lists and seconds of training at 1M rows
IVF_POINTS_PER_LIST = 64
#: an IVF query for k rows scans at least this many rows per result (more lists than
#: ``nprobe`` when k is large next to a list): a top-k out of barely k scanned rows
#: misses much (like HNSW's efSearch below k)
IVF_ROWS_PER_RESULT = 10


@dataclass(frozen=True)
class IndexSettings:
    """How :func:`open_index` chooses and builds an index.

    ``backend``: "auto" (an approximate index from ``threshold`` rows when FAISS is
    installed, else exact), "exact" (always exact) or "faiss" (approximate whatever the
    size; exact when FAISS is missing). ``kind``: which approximate index, "hnsw" or
    "ivf" (see the module docstring: "ivf" for maximum-inner-product keys such as a
    two-tower's, "hnsw" for unit vectors).

    HNSW: ``m`` and ``ef_construction`` shape the graph (more: better recall, slower
    build), ``ef_search`` is the search breadth (more: better recall, slower queries).

    IVF: ``nlist`` k-means lists (None: ``2 * sqrt(rows)``, 2,000 at 1M rows), of which
    ``nprobe`` are scanned per query (None: an eighth of the lists). More probes: better
    recall, slower queries, linearly; ``nprobe == nlist`` is exact. On 1M two-tower keys
    (docs/benchmarks.md, "Engine.recommend at 1M items") an eighth gave recall@10
    0.998-1.0 against exact in ~4 ms, a sixteenth ~0.99 in ~2 ms."""

    backend: str = "auto"
    threshold: int = APPROX_THRESHOLD
    kind: str = "hnsw"
    m: int = 32
    ef_construction: int = 40
    ef_search: int = 512
    nlist: int | None = None
    nprobe: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"index backend must be one of {BACKENDS}, not '{self.backend}'")
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, not '{self.kind}'")
        for name in ("nlist", "nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"index {name} must be at least 1, not {value}")

    def lists(self, rows: int) -> int:
        """IVF lists for a matrix of ``rows`` rows (``nlist``, or ``2 * sqrt(rows)``),
        never more than the rows."""
        wanted = self.nlist if self.nlist is not None else round(2 * math.sqrt(rows))
        return max(1, min(int(wanted), rows))

    def probes(self, nlist: int) -> int:
        """IVF lists scanned per query (``nprobe``, or an eighth of ``nlist``)."""
        wanted = self.nprobe if self.nprobe is not None else math.ceil(nlist / 8)
        return max(1, min(int(wanted), nlist))


class VectorIndex(Protocol):
    """Top-k rows of a matrix by inner product with a query."""

    kind: str

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [k'], rows [k']) best first, k' <= k, for one query vector [dim]."""


class ExactIndex:
    """Exact top-k: one matrix-vector product and ``torch.topk``."""

    kind = "exact"

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.matrix @ query.float().flatten()
        return torch.topk(scores, min(k, scores.shape[0]))


class HnswIndex:
    """A FAISS HNSW graph over the matrix (inner product); approximate."""

    kind = "hnsw"

    def __init__(self, index: Any, ef_search: int) -> None:
        self.index = index
        self.ef_search = ef_search
        index.hnsw.efSearch = ef_search

    @classmethod
    def build(cls, matrix: torch.Tensor, settings: IndexSettings) -> "HnswIndex":
        import faiss
        x = np.ascontiguousarray(matrix.detach().float().cpu().numpy())
        index = faiss.IndexHNSWFlat(x.shape[1], settings.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        index.add(x)
        return cls(index, settings.ef_search)

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = np.ascontiguousarray(query.detach().float().cpu().numpy().reshape(1, -1))
        k = min(k, self.index.ntotal)
        # a wider search than k keeps recall when k exceeds efSearch
        params = None
        if k > self.ef_search:
            import faiss
            params = faiss.SearchParametersHNSW(efSearch=k)
        scores, rows = self.index.search(q, k, params=params)
        keep = rows[0] >= 0  # fewer than k reachable: FAISS pads with -1
        return torch.from_numpy(scores[0][keep]), torch.from_numpy(rows[0][keep].astype(np.int64))

    def save(self, path: Path) -> None:
        import faiss
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, settings: IndexSettings) -> "HnswIndex":
        import faiss
        return cls(faiss.read_index(str(path)), settings.ef_search)


class IvfIndex:
    """A FAISS inverted-file index over the matrix (inner product): k-means lists, the
    best-scoring ``nprobe`` of them scanned exactly (more when a query asks for more
    than a tenth of the rows they hold: ``IVF_ROWS_PER_RESULT``); approximate below
    ``nprobe == nlist``."""

    kind = "ivf"

    def __init__(self, index: Any, nprobe: int) -> None:
        self.index = index
        self.nprobe = max(1, min(int(nprobe), index.nlist))
        index.nprobe = self.nprobe

    @classmethod
    def build(cls, matrix: torch.Tensor, settings: IndexSettings) -> "IvfIndex":
        import faiss
        x = np.ascontiguousarray(matrix.detach().float().cpu().numpy())
        nlist = settings.lists(x.shape[0])
        quantizer = faiss.IndexFlatIP(x.shape[1])
        index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = IVF_POINTS_PER_LIST  # a fixed-seed sample
        index.cp.min_points_per_centroid = 1  # tiny matrices: no warning
        index.train(x)
        index.add(x)
        return cls(index, settings.probes(nlist))

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss
        q = np.ascontiguousarray(query.detach().float().cpu().numpy().reshape(1, -1))
        k = min(k, self.index.ntotal)
        per_list = self.index.ntotal / self.index.nlist
        nprobe = max(self.nprobe, min(self.index.nlist,
                                      math.ceil(IVF_ROWS_PER_RESULT * k / per_list)))
        while True:  # the probed lists hold fewer than k rows: probe more of them
            params = None if nprobe == self.nprobe else faiss.SearchParametersIVF(nprobe=nprobe)
            scores, rows = self.index.search(q, k, params=params)
            keep = rows[0] >= 0  # FAISS pads with -1
            if bool(keep.all()) or nprobe >= self.index.nlist:
                break
            nprobe = min(self.index.nlist, nprobe * 4)
        return torch.from_numpy(scores[0][keep]), torch.from_numpy(rows[0][keep].astype(np.int64))

    def save(self, path: Path) -> None:
        import faiss
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, settings: IndexSettings) -> "IvfIndex":
        import faiss
        index = faiss.read_index(str(path))
        return cls(index, settings.probes(index.nlist))


APPROXIMATE = {"hnsw": HnswIndex, "ivf": IvfIndex}


def faiss_available() -> bool:
    """True when FAISS can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def matrix_fingerprint(matrix: torch.Tensor) -> str:
    """A digest of the matrix's shape and bytes (BLAKE2b, 16 bytes, hex): changes with
    any change of any vector."""
    array = np.ascontiguousarray(matrix.detach().float().cpu().numpy())
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(array.shape).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def index_key(name: str, fingerprint: str, settings: IndexSettings,
              rows: int | None = None) -> str:
    """The file stem of a persisted index: a digest of what it was built from and how
    (``rows``: the matrix's, which sets an IVF's default number of lists; needed then)."""
    if settings.kind == "ivf":
        if rows is None and settings.nlist is None:
            raise ValueError("an IVF index's key needs the matrix's rows (or nlist)")
        nlist = settings.lists(rows) if rows is not None else settings.nlist
        text = f"{name}|{fingerprint}|ivf|nlist={nlist}"
    else:  # unchanged since the first HNSW files: those saved already stay valid
        text = f"{name}|{fingerprint}|hnsw|m={settings.m}|efc={settings.ef_construction}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def wants_approximate(rows: int, settings: IndexSettings) -> bool:
    """Whether :func:`open_index` would use an approximate index for ``rows`` rows."""
    if settings.backend == "exact" or not faiss_available():
        return False
    return settings.backend == "faiss" or rows >= settings.threshold


#: index files kept per kind and space (the newest by modification time)
KEEP_FILES = 2


def _space(name: str) -> str:
    """The vector space a name belongs to, as a file-name part: the name less a model
    version ('recommend:v8' -> 'recommend'), so each space keeps its own newest files."""
    base = re.sub(r":v\d+$", "", name)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


def index_path(directory: Path, name: str, fingerprint: str, settings: IndexSettings,
               rows: int | None = None) -> Path:
    """Where the index of ``settings.kind`` over a matrix of ``rows`` rows with this
    ``fingerprint`` is saved under ``directory``: ``<kind>-<space>-<key>.faiss``."""
    key = index_key(name, fingerprint, settings, rows)
    return Path(directory) / f"{settings.kind}-{_space(name)}-{key}.faiss"


def prune_saved(path: Path, keep: int = KEEP_FILES) -> None:
    """Keep the ``keep`` newest index files of ``path``'s kind and space (``path``
    among them); also remove files named as before spaces were (``<kind>-<key>.faiss``,
    never read again). Failures are logged."""
    stem = path.name[:-len(path.name.rsplit("-", 1)[1])]  # '<kind>-<space>-'
    kind = stem.split("-", 1)[0]
    try:
        mine = beyond_newest(path.parent.glob(f"{stem}{'?' * 32}.faiss"), keep)
        legacy = list(path.parent.glob(f"{kind}-{'?' * 32}.faiss"))
        for stale in [p for p in mine if p != path] + legacy:
            stale.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not prune old index files beside %s: %s", path, exc)


def load_saved(matrix: torch.Tensor, path: Path | None, settings: IndexSettings
               ) -> "HnswIndex | IvfIndex | None":
    """The index saved at ``path`` when it exists, is of ``settings.kind`` and fits the
    matrix's shape."""
    if path is None or not path.exists():
        return None
    try:
        found = APPROXIMATE[settings.kind].load(path, settings)
    except Exception as exc:  # noqa: BLE001 - a broken file is rebuilt
        log.warning("index %s unreadable (%s): rebuilding it", path, exc)
        return None
    if found.index.ntotal != matrix.shape[0] or found.index.d != matrix.shape[1]:
        return None
    return found


def build_and_save(matrix: torch.Tensor, name: str, path: Path | None,
                   settings: IndexSettings) -> "HnswIndex | IvfIndex":
    """Build the ``settings.kind`` index and save it at ``path`` (when given; atomically)."""
    log.info("building an %s index over %s x %s vectors (%s)", settings.kind.upper(),
             *matrix.shape, name)
    index = APPROXIMATE[settings.kind].build(matrix, settings)
    if path is not None:
        try:
            save_atomically(index, path)
        except OSError as exc:  # a read-only place: serve from memory
            log.warning("could not save the index to %s: %s", path, exc)
        else:
            prune_saved(path)
    return index


def open_index(matrix: torch.Tensor, *, name: str, settings: IndexSettings | None = None,
               directory: Path | None = None, fingerprint: str | None = None) -> VectorIndex:
    """The index to search ``matrix`` with: exact, or the ``settings.kind`` index loaded
    from ``directory`` when a previous process saved one for the same ``name`` and
    vectors, else built now and saved there (atomically: a reader never sees half a file).

    ``fingerprint`` identifies the vectors (computed from the matrix when None);
    ``directory`` None keeps the index in memory only."""
    settings = settings or IndexSettings()
    if matrix.ndim != 2 or not wants_approximate(matrix.shape[0], settings):
        return ExactIndex(matrix)
    fingerprint = fingerprint or matrix_fingerprint(matrix)
    path = (index_path(directory, name, fingerprint, settings, matrix.shape[0])
            if directory is not None else None)
    return load_saved(matrix, path, settings) or build_and_save(matrix, name, path, settings)


class IndexSlot:
    """The index a vector space searches with now. Exact until an approximate index is
    ready: a saved one is loaded at once, a missing one is built on a background thread
    (requests meanwhile are answered exactly), saved, then swapped in."""

    def __init__(self, matrix: torch.Tensor, *, name: str, settings: IndexSettings | None = None,
                 directory: Path | None = None, fingerprint: str | None = None,
                 background: bool = True) -> None:
        self.settings = settings or IndexSettings()
        self.current: VectorIndex = ExactIndex(matrix)
        self.error: str | None = None
        self._done = threading.Event()
        if matrix.ndim != 2 or not wants_approximate(matrix.shape[0], self.settings):
            self._done.set()
            return
        rows = matrix.shape[0]
        path = (index_path(directory, name, fingerprint, self.settings, rows)
                if directory is not None and fingerprint is not None else None)
        saved = load_saved(matrix, path, self.settings)
        if saved is not None:
            self.current = saved
            self._done.set()
            return

        def build() -> None:
            try:
                where = path
                if where is None and directory is not None:
                    where = index_path(directory, name, matrix_fingerprint(matrix),
                                       self.settings, rows)
                    found = load_saved(matrix, where, self.settings)
                    if found is not None:
                        self.current = found
                        return
                self.current = build_and_save(matrix, name, where, self.settings)
            except Exception as exc:  # noqa: BLE001 - exact search goes on
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("%s index for %s failed: %s; searching exactly",
                            self.settings.kind.upper(), name, self.error)
            finally:
                self._done.set()

        if background:
            # not a daemon: the process finishes a build before it exits (the index is
            # saved for the next one), and a daemon thread in FAISS's C++ code when the
            # interpreter shuts down aborted the process (exit 134, 1M-item IVF build)
            threading.Thread(target=build, name=f"polyrec-index-{name}", daemon=False).start()
        else:
            build()

    @property
    def kind(self) -> str:
        return self.current.kind

    def ready(self) -> bool:
        """True when no build is running (the index in use is the final one)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background build; True when it finished."""
        return self._done.wait(timeout)


def save_atomically(index: "HnswIndex | IvfIndex", path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename it into place."""
    write_atomically(path, index.save)
