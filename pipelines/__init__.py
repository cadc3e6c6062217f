"""Ready-made pipelines and scripts built on streamprune (training the default model, live QA, robot loops)."""
