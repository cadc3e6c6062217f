"""The runtime: jobs assembled from the library rooms below it (decode, sources, models, memory,
pruning, transport). Live streams: `live_runner` drives `live_stages` (encode with the recipe's
STC-Cacher -> per-unit selection -> bounded memory + LLM) through `queues`, in-process or as Ray
actors. Batches: `batch_job` plans, decodes and answers many files (`batch_inputs`,
`batch_results`), in-process or on Ray (`batch_ray`). Robots: `robot` runs a VLA in a gym env."""
