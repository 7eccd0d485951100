"""Vectors in, ranked hits out: the VectorStore contract, its FAISS and Qdrant stores, query building."""
