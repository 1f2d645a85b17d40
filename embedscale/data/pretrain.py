"""Retrieval-oriented pre-training pairs made on the fly from unlabelled documents (data.format=corpus).

Two tasks turn one document into a (query, positive) pair:

- ICT, the inverse cloze task (Lee et al. 2019, ORQA): a random sentence is the query, the rest of the
  document (its title prepended) the positive. With probability `ict_keep_prob` the sentence stays in the
  positive, so the model does not learn that overlap means "not relevant".
- spans, independent cropping (Contriever, Izacard et al. 2021): two independent random contiguous word
  spans of the document, query and positive.

Why pairs are made per (epoch, document) and not once: every epoch sees new sentences and crops of the
same documents, which is the point of these tasks. Why `random.Random(f"{seed}:{epoch}:{doc_id}")`: a
string seed is hashed with SHA-512, so the pair is the same in every process (no PYTHONHASHSEED
dependence) and does not depend on the order in which pairs are asked for. Why the dataset is indexed
by `(epoch, i)`: DataLoader workers hold a copy of the dataset made once (persistent workers), so they
cannot be told the epoch; the sampler, which Lightning does tell, puts it in the index instead.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from collections.abc import Sequence

from embedscale.config import PretrainConfig
from embedscale.data.batch import PairExample

log = logging.getLogger(__name__)

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: split after `.`, `!` or `?` followed by whitespace (simple, language-agnostic)."""
    return [s for s in SENTENCE_END.split(text.strip()) if s]


class PretrainPairs(Sequence[PairExample]):
    """One (query, positive) pair per usable document and epoch, made when asked for.

    Index with `(epoch, i)` (what `GlobalBatchSampler` yields for this dataset); `examples(epoch)` makes a
    whole epoch (the sampler's duplicate check, tests). Documents with fewer than `cfg.min_words` words are
    not used; they are counted in `stats` and logged.
    """

    def __init__(self, documents: Sequence[tuple[str, str, str]], cfg: PretrainConfig, *, seed: int, name: str) -> None:
        """Args:
        documents: (doc id, title, text), e.g. from `read_corpus_documents`; ids must be unique.
        cfg: data.pretrain.
        seed: the run's seed; pairs are a function of (seed, epoch, doc id).
        name: key prefix of the pairs (the corpus's name).
        """
        self.cfg, self.seed, self.name = cfg, seed, name
        self.documents = [d for d in documents if len(d[2].split()) >= cfg.min_words]
        too_short = len(documents) - len(self.documents)
        if too_short:
            log.warning(
                "%d of %d documents shorter than data.pretrain.min_words=%d are not used",
                too_short,
                len(documents),
                cfg.min_words,
            )
        if not self.documents:
            raise ValueError(
                f"no usable document in corpus {name!r} (data.path): {len(documents)} documents, none with "
                f"data.pretrain.min_words={cfg.min_words} words; point data.path at a corpus of longer documents "
                "or lower data.pretrain.min_words"
            )
        self._stats = {"documents": len(documents), "too_short": too_short, "used": len(self.documents)}

    @property
    def stats(self) -> dict[str, int]:
        """documents, too_short, used; after `examples(epoch)` also that epoch's pairs by task: ict, spans,
        ict_fallback (ICT drawn, but fewer than 2 sentences or none of min_query_words words: spans made)."""
        return dict(self._stats)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index):  # (epoch, i) -> PairExample
        if not isinstance(index, tuple):
            raise TypeError(
                "PretrainPairs is indexed by (epoch, i): pairs change each epoch (use GlobalBatchSampler, which "
                "yields such indices for it, or examples(epoch))"
            )
        epoch, i = index
        return self._pair(epoch, i)[0]

    def examples(self, epoch: int) -> list[PairExample]:
        """All pairs of an epoch, in document order; records the epoch's counts by task in `stats`."""
        made = [self._pair(epoch, i) for i in range(len(self.documents))]
        counts = Counter(task for _, task in made)
        self._stats.update(epoch=epoch, ict=counts["ict"], spans=counts["spans"], ict_fallback=counts["ict_fallback"])
        return [pair for pair, _ in made]

    def _pair(self, epoch: int, i: int) -> tuple[PairExample, str]:
        doc_id, title, text = self.documents[i]
        rng = random.Random(f"{self.seed}:{epoch}:{doc_id}")
        task = self.cfg.task
        if task == "mixed":
            task = "ict" if rng.random() < 0.5 else "spans"
        made = self._ict(rng, title, text) if task == "ict" else None
        if made is None:
            made = self._spans(rng, text)
            task = "ict_fallback" if task == "ict" else "spans"
        query, positive = made
        return PairExample(query, positive, key=f"{self.name}:{doc_id}:e{epoch}"), task

    def _ict(self, rng: random.Random, title: str, text: str) -> tuple[str, str] | None:
        """A sentence of >= min_query_words words, and the document without it (unless kept); None if impossible."""
        sentences = split_sentences(text)
        candidates = [j for j, s in enumerate(sentences) if len(s.split()) >= self.cfg.min_query_words]
        if len(sentences) < 2 or not candidates:
            return None
        j = rng.choice(candidates)
        keep = rng.random() < self.cfg.ict_keep_prob
        rest = " ".join(s for k, s in enumerate(sentences) if keep or k != j)
        return sentences[j], f"{title} {rest}" if title else rest

    def _spans(self, rng: random.Random, text: str) -> tuple[str, str]:
        words = text.split()
        return self._span(rng, words), self._span(rng, words)

    def _span(self, rng: random.Random, words: list[str]) -> str:
        """A contiguous span of length uniform in [min, max ratio] x len(words), >= min_query_words if possible."""
        n = len(words)
        lo = max(math.ceil(self.cfg.span_min_ratio * n - 1e-9), min(self.cfg.min_query_words, n), 1)  # 0.1 * 30
        hi = max(math.floor(self.cfg.span_max_ratio * n + 1e-9), lo)  # is 3.0000000000000004
        length = rng.randint(lo, hi)
        start = rng.randint(0, n - length)
        return " ".join(words[start : start + length])
