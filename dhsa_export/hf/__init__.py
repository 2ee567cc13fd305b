"""transformers integration: model loading, the "dhsa" attention function, generation."""
