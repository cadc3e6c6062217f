"""Datasets: synthetic video question answering with known answers."""
