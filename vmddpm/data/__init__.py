"""Datasets: official sources, verified downloads, raw layout -> slices, demo phantoms."""
