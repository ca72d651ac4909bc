"""Counter-fitted word vectors (Mrkšić et al., "Counter-fitting Word Vectors to Linguistic Constraints", NAACL 2016).

TextFooler (Jin et al. 2020) draws its synonym candidates from GloVe vectors counter-fitted with PPDB
synonyms and PPDB/WordNet antonyms. The published vectors are not available offline, so we build them
here from GloVe 6B 50d and the same constraint lists. The objective is the paper's Eq. 1-4, with
``d(u, v) = 1 - cos(u, v)`` and ``tau(x) = max(0, x)``:

- antonym repel       AR(V')     = sum_{(u,w) in A} tau(delta - d(v'_u, v'_w))            (Eq. 1), delta = 1.0
- synonym attract     SA(V')     = sum_{(u,w) in S} tau(d(v'_u, v'_w) - gamma)            (Eq. 2), gamma = 0.0
- vector space pres.  VSP(V, V') = sum_i sum_{j in N(i)} tau(d(v'_i, v'_j) - d(v_i, v_j)) (Eq. 3), N(i): d(v_i, v_j) < rho = 0.2
  (antonyms of i excluded from N(i), else Eq. 3 would cancel Eq. 1 for antonyms that start close)
- C(V, V') = k1 AR + k2 SA + k3 VSP                                                       (Eq. 4), k1 = k2 = k3 = 0.1

Cheaper than the paper's 20 epochs of per-pair SGD: full-batch Adam on all pairs at once (vectorized),
the vocabulary restricted to the most frequent words, and N(i) restricted to the words that appear in a
constraint (only they move; a word outside every constraint keeps its GloVe vector unless it is a
neighbour of one that moves) and capped at ``max_neighbours`` nearest per word.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tightrope import assets
from tightrope.attacks import resources


@dataclass(frozen=True)
class CounterFitConfig:
    """Constants of Mrkšić et al. 2016 (Sec. 3-4), plus the vocabulary size and optimiser of our cheap solver."""

    vocab_size: int = 65_000
    delta: float = 1.0  # Eq. 1: antonyms pushed at least this far apart (cosine distance)
    gamma: float = 0.0  # Eq. 2: synonyms pulled closer than this
    rho: float = 0.2  # Eq. 3: neighbourhood radius (cosine distance) preserved
    k1: float = 0.1
    k2: float = 0.1
    k3: float = 0.1
    steps: int = 100  # full-batch Adam steps; in a trial on 65k words the loss fell 2238 -> 127 in 50 steps, 112 by 100
    lr: float = 0.02
    max_neighbours: int = 10


# --- pure maths --------------------------------------------------------------------------------------


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def pair_distance(v: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Cosine distance d = 1 - cos for each row (i, j) of ``pairs`` (P, 2) over unit-norm rows of v."""
    u = normalize(v)
    return 1.0 - (u[pairs[:, 0]] * u[pairs[:, 1]]).sum(-1)  # (P,)


def antonym_repel(v: torch.Tensor, antonyms: torch.Tensor, delta: float) -> torch.Tensor:
    """Eq. 1: sum of tau(delta - d(v_u, v_w)) over antonym pairs."""
    return torch.relu(delta - pair_distance(v, antonyms)).sum()


def synonym_attract(v: torch.Tensor, synonyms: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 2: sum of tau(d(v_u, v_w) - gamma) over synonym pairs."""
    return torch.relu(pair_distance(v, synonyms) - gamma).sum()


def vector_space_preservation(v: torch.Tensor, neighbours: torch.Tensor, original_distance: torch.Tensor) -> torch.Tensor:
    """Eq. 3: sum of tau(d(v'_i, v'_j) - d(v_i, v_j)) over the original rho-neighbourhoods."""
    return torch.relu(pair_distance(v, neighbours) - original_distance).sum()


def neighbourhood_pairs(vectors: torch.Tensor, rows: torch.Tensor, rho: float, max_neighbours: int,
                        chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (i, j), i in ``rows``, j != i with d(v_i, v_j) < rho (at most ``max_neighbours`` per i), and d."""
    unit = normalize(vectors)
    pairs, dists = [], []
    k = min(max_neighbours + 1, len(unit))
    for start in range(0, len(rows), chunk):
        idx = rows[start:start + chunk]
        cos = unit[idx] @ unit.T  # (C, V)
        cos[torch.arange(len(idx)), idx] = -2.0  # not its own neighbour
        top, j = cos.topk(k, dim=1)  # (C, k)
        keep = (1.0 - top) < rho
        i = idx[:, None].expand_as(j)
        pairs.append(torch.stack([i[keep], j[keep]], dim=1))
        dists.append(1.0 - top[keep])
    return torch.cat(pairs), torch.cat(dists)


def counter_fit(vectors: np.ndarray, synonyms: np.ndarray, antonyms: np.ndarray, config: CounterFitConfig,
                progress=None) -> np.ndarray:
    """Minimise Eq. 4 from the (unit-normalised) GloVe vectors; returns unit-norm counter-fitted vectors.

    ``synonyms`` and ``antonyms`` are (P, 2) integer arrays of row indices into ``vectors``.
    """
    v0 = normalize(torch.from_numpy(np.asarray(vectors, dtype=np.float32)))
    syn = torch.from_numpy(np.asarray(synonyms, dtype=np.int64).reshape(-1, 2))
    ant = torch.from_numpy(np.asarray(antonyms, dtype=np.int64).reshape(-1, 2))
    moving = torch.unique(torch.cat([syn.flatten(), ant.flatten()]))
    nbr, nbr_dist = neighbourhood_pairs(v0, moving, config.rho, config.max_neighbours)
    # An antonym pair inside each other's rho-neighbourhood would be held together by Eq. 3 while Eq. 1
    # pushes it apart; the linguistic constraint wins, so such pairs leave N(i).
    n = len(v0)
    banned = set((ant[:, 0] * n + ant[:, 1]).tolist()) | set((ant[:, 1] * n + ant[:, 0]).tolist())
    if banned:
        keep = torch.tensor([int(k) not in banned for k in (nbr[:, 0] * n + nbr[:, 1]).tolist()], dtype=torch.bool)
        nbr, nbr_dist = nbr[keep], nbr_dist[keep]
    v = v0.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=config.lr)
    for step in range(config.steps):
        opt.zero_grad()
        loss = (config.k1 * antonym_repel(v, ant, config.delta)
                + config.k2 * synonym_attract(v, syn, config.gamma)
                + config.k3 * vector_space_preservation(v, nbr, nbr_dist))
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    return normalize(v.detach()).numpy()


# --- the cached vocabulary ------------------------------------------------------------------------------


class WordEmbedding:
    """Unit-norm word vectors with a vocabulary; nearest neighbours by cosine."""

    def __init__(self, words: list[str], vectors: np.ndarray, description: dict | None = None):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.description = description or {}

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def cosine(self, a: str, b: str) -> float | None:
        if a not in self.index or b not in self.index:
            return None
        return float(self.vectors[self.index[a]] @ self.vectors[self.index[b]])

    def neighbours(self, words: list[str], k: int, min_cos: float = -1.0) -> list[list[tuple[str, float]]]:
        """For each word, up to ``k`` nearest other words with cosine >= ``min_cos`` (one matrix product)."""
        known = [i for i, w in enumerate(words) if w in self.index]
        out: list[list[tuple[str, float]]] = [[] for _ in words]
        if not known:
            return out
        rows = torch.tensor([self.index[words[i]] for i in known])
        cos = self.vectors[rows] @ self.vectors.T  # (W, V)
        cos[torch.arange(len(rows)), rows] = -2.0
        top, idx = cos.topk(min(k, len(self.words) - 1), dim=1)
        for slot, i in enumerate(known):
            out[i] = [(self.words[j], float(c)) for c, j in zip(top[slot].tolist(), idx[slot].tolist()) if c >= min_cos]
        return out


SOLVER_VERSION = 2  # bump when the solver changes, so that cached vectors are rebuilt


def _cache_key(config: CounterFitConfig, sources: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps({**asdict(config), "solver": SOLVER_VERSION}, sort_keys=True).encode())
    for src in sources:
        digest.update(f"{src.name}:{src.stat().st_size}".encode())
    return digest.hexdigest()[:12]


def counter_fitted_embedding(config: CounterFitConfig = CounterFitConfig(), data_dir=None, progress=None) -> WordEmbedding:
    """Counter-fitted GloVe 50d, built once (about a minute on 2 cores) and cached as .npy + word list."""

    index_file, emb_file = resources.glove_files()
    folder = resources.counterfitting_dir(data_dir)
    key = _cache_key(config, [emb_file, *sorted(folder.glob("*.txt.gz"))])
    cache = assets.cache_dir() / "counterfit" / key
    description = {"source": "GloVe 6B 50d counter-fitted (Mrkšić et al. 2016)", "key": key, **asdict(config)}
    if (cache / "vectors.npy").exists() and (cache / "words.txt").exists():
        words = (cache / "words.txt").read_text(encoding="utf-8").split("\n")
        return WordEmbedding(words, np.load(cache / "vectors.npy", allow_pickle=False), description)
    words, vectors = resources.load_glove(config.vocab_size)
    lookup = {w: i for i, w in enumerate(words)}
    synonyms, antonyms = resources.constraint_pairs(data_dir)

    def rows(pairs):
        kept = [(lookup[a], lookup[b]) for a, b in pairs if a in lookup and b in lookup and a != b]
        return np.array(kept, dtype=np.int64).reshape(-1, 2)

    fitted = counter_fit(vectors, rows(synonyms), rows(antonyms), config, progress)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(cache / "vectors.tmp.npy", fitted)
    (cache / "vectors.tmp.npy").replace(cache / "vectors.npy")
    (cache / "words.txt").write_text("\n".join(words), encoding="utf-8")
    return WordEmbedding(words, fitted, description)
