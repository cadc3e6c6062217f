"""Jobs assembled from the library pieces (decode, sources, models, pruning), e.g. `batch`: one
question answered about many video files, optionally spread over a Ray cluster."""
