"""A labelled Hebrew relevance set (issue 12): a generated corpus, graded queries, nDCG@10 / recall@10."""
