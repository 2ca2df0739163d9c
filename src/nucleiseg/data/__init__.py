"""The dataset: raw layout and image reading, download and sources, the synthetic generator, the tile store."""
