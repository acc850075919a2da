"""Exercise 7: BM25, the retrieval rung of the ladder.

A document d scores, for each distinct query word w it contains f(w, d) times,
    idf(w) * f(w, d) * (k1 + 1) / (f(w, d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(w) = ln(1 + (N - n(w) + 0.5) / (n(w) + 0.5)),
with N documents, n(w) of them containing w, |d| the document's length in words and avgdl the mean length.
Words are lower-cased runs of letters and digits: re.findall(r"[a-z0-9]+", text.lower()).

    python workshop/check.py 7          # checks this file against handtune's eval.BM25
"""

import math  # noqa: F401
import re  # noqa: F401
from collections import Counter  # noqa: F401


def bm25_scores(documents, query, k1=1.5, b=0.75):
    """[score of each document for the query]."""
    # TODO
    raise NotImplementedError("exercise 7: write bm25_scores")
