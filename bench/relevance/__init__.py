"""A labelled Hebrew relevance set: a generated corpus, graded queries, nDCG@10 / recall@10."""
