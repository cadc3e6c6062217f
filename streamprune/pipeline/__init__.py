"""Jobs assembled from the library pieces (decode, models, pruning): `batch` answers a question about
many video files, optionally spread over a Ray cluster."""
