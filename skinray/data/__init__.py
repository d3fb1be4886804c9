"""The image data layer: archive -> catalog -> decode -> augment -> Ray Data pipeline."""
