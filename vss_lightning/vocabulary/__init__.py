"""A corpus vocabulary: label ids that mean the same thing in every video of a corpus.

`prototypes` (what the pipeline keeps per video and label), `kmeans` (weighted cosine K-Means, in
memory and streaming), `fit` (corpus prototypes -> G global classes) and `apply` (a labelled corpus
rewritten in global ids). Command line: `python -m vss_lightning.vocabulary {fit,apply} --help`.
"""
