"""Input pipelines and conditioning augmentation."""
