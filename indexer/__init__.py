"""Images in, vectors out: sources, safe decoding, the open_clip encoder and the indexing pipeline."""
