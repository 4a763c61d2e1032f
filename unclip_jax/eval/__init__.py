"""Evaluation: pixel analysis of Shapes-world images, CLIP R-precision, Frechet distance."""
