"""Feature extractors: VGG-19 pool5 maps and VGGish embeddings, with their weights and preprocessing."""
