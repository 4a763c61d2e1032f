"""Image-text and distribution metrics: CLIPScore, CLIP R-precision and the Frechet distance.

CLIPScore (Hessel et al. 2021): per image, w * max(cos(image embedding, its
caption's text embedding), 0), averaged over the images. Hessel et al. use
w = 2.5 (their CLIP-S); text-to-image papers and torchmetrics' CLIPScore use
w = 100, i.e. the clipped cosine similarity in percent.

R-precision (AttnGAN's, Xu et al. 2018, scored with CLIP as in Park et al.
2021): a generated image is a hit when its CLIP image embedding is more similar
(cosine) to its own caption's text embedding than to each of K distractor
captions (K = 20 here, drawn from other captions of the same world, each
different from the true one). A tie (within 1e-9, so that rounding cannot
decide it) is a miss. The score is the mean hit rate.

Frechet distance (FID's formula, here on any features, e.g. CLIP image
embeddings): fit a Gaussian to each feature set and compute
  |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
Tr (S_a S_b)^(1/2) is computed as the sum of the square roots of the eigenvalues
of S_a^(1/2) S_b S_a^(1/2), a symmetric PSD matrix with the same spectrum as
S_a S_b, so everything is real (eigh); method="sqrtm" uses scipy.linalg.sqrtm on
S_a S_b instead, as pytorch-fid does, dropping tiny imaginary parts.
"""

from collections.abc import Sequence

import numpy as np
from scipy import linalg

TIE_TOLERANCE = 1e-9  # cosine similarities closer than this are a tie (a miss)


def _normalise(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sample_distractors(captions: Sequence[str], pool: Sequence[str], num_distractors: int = 20,
                       seed: int = 0) -> np.ndarray:
  """Indices [N, K] into `pool`: for each caption, K distinct pool captions, all different from it.

  The pool is deduplicated first (by text), so no two distractors of an image
  are the same caption. Deterministic given the seed.
  """
  first = {}
  for i, text in enumerate(pool):
    first.setdefault(text, i)
  unique_texts = list(first)
  unique_index = np.array(list(first.values()))
  rng = np.random.default_rng(seed)
  out = np.empty((len(captions), num_distractors), np.int64)
  for row, caption in enumerate(captions):
    allowed = np.array([j for j, text in enumerate(unique_texts) if text != caption])
    if len(allowed) < num_distractors:
      raise ValueError(f"The pool has {len(allowed)} captions other than {caption!r}; "
                       f"{num_distractors} distractors are needed.")
    out[row] = unique_index[rng.choice(allowed, size=num_distractors, replace=False)]
  return out


def r_precision(image_embeds, text_embeds, distractor_embeds=None, *, captions: Sequence[str] | None = None,
                num_distractors: int = 20, seed: int = 0, per_image: bool = False):
  """CLIP R-precision: the fraction of images whose own caption beats all its distractors.

  image_embeds [N, D] and text_embeds [N, D]: image i and its caption's
  embedding (unnormalised is fine; cosine similarity is used).
  distractor_embeds: [N, K, D], image i's K distractor captions; or None, to
  draw K distractors for each image from the other rows of text_embeds whose
  caption differs from its own (`captions` [N] gives the texts; without them
  every other row counts as a different caption).
  per_image=True returns the hits [N] bool instead of their mean.
  """
  images = _normalise(image_embeds)
  texts = _normalise(text_embeds)
  if images.shape != texts.shape or images.ndim != 2:
    raise ValueError(f"image_embeds {images.shape} and text_embeds {texts.shape} must both be [N, D].")
  if distractor_embeds is None:
    names = list(captions) if captions is not None else [str(i) for i in range(len(texts))]
    if len(names) != len(texts):
      raise ValueError(f"{len(names)} captions for {len(texts)} text embeddings.")
    index = sample_distractors(names, names, num_distractors, seed)  # rows of one caption share an embedding
    distractors = texts[index]
  else:
    distractors = _normalise(distractor_embeds)
    if distractors.ndim != 3 or distractors.shape[0] != len(images) or distractors.shape[2] != images.shape[1]:
      raise ValueError(f"distractor_embeds must be [N, K, D] = [{len(images)}, K, {images.shape[1]}], "
                       f"got {distractors.shape}.")
  own = np.sum(images * texts, -1)  # [N]
  others = np.einsum("nd,nkd->nk", images, distractors)  # [N, K]
  hits = own > others.max(-1) + TIE_TOLERANCE
  return hits if per_image else float(hits.mean())


def clip_score(image_embeds, text_embeds, weight: float = 100.0) -> float:
  """Mean over the images of weight * max(cos, 0) between image i [N, D] and its caption's embedding [N, D]."""
  images, texts = _normalise(image_embeds), _normalise(text_embeds)
  if images.shape != texts.shape or images.ndim != 2:
    raise ValueError(f"image_embeds {images.shape} and text_embeds {texts.shape} must both be [N, D].")
  return float(weight * np.mean(np.maximum(np.sum(images * texts, -1), 0.0)))


def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray, method: str) -> float:
  """Tr (cov_a cov_b)^(1/2) for symmetric PSD matrices."""
  if method == "eigh":
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    inner = root_a @ cov_b @ root_a
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None))))
  if method == "sqrtm":
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(root)):  # singular product: offset the diagonals, as pytorch-fid does
      offset = np.eye(len(cov_a)) * 1e-6
      root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(root):
      imaginary = np.max(np.abs(root.imag))
      if imaginary > 1e-3 * max(1.0, np.max(np.abs(root.real))):
        raise ValueError(f"sqrtm(S_a S_b) has an imaginary part of {imaginary:.3g}; the covariances are not PSD.")
      root = root.real
    return float(np.trace(root))
  raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}.")


def frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b, method: str = "eigh") -> float:
  """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for two Gaussians."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
  if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.size, mu_a.size):
    raise ValueError(f"Shapes do not match: mu {mu_a.shape} / {mu_b.shape}, cov {cov_a.shape} / {cov_b.shape}.")
  distance = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2.0 * _trace_sqrt_product(cov_a, cov_b, method))
  return float(max(distance, 0.0))


def gaussian_fit(feats) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D], the unbiased (N - 1) covariance as FID uses."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or len(feats) < 2:
    raise ValueError(f"Features must be [N, D] with N >= 2, got shape {feats.shape}.")
  return feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(feats_a, feats_b, method: str = "eigh") -> float:
  """Frechet distance between Gaussians fitted to features [N_a, D] and [N_b, D]."""
  mu_a, cov_a = gaussian_fit(feats_a)
  mu_b, cov_b = gaussian_fit(feats_b)
  return frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b, method)
