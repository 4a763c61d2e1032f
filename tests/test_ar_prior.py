"""The autoregressive prior (issue #25): its codebook (PCA and buckets) against closed forms, the causal
Transformer's masking and key/value cache against teacher forcing, classifier-free guidance's wiring, and
a tiny model that overfits a batch and then samples its codes back."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.convert import scan_layout
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.stages import ar_prior as ar_stage

TINY = ar_lib.ARPriorConfig(clip_dim=8, text_width=6, num_text_tokens=5, num_codes=6, num_buckets=32,
                            num_dot_buckets=4, width=32, num_layers=2, num_heads=2)


def _embeddings(n: int, dim: int, seed: int = 0):
  """Correlated Gaussian z_i and z_t [n, dim] with a known covariance spectrum (z_t near z_i)."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  scales = np.geomspace(3.0, 0.01, dim)
  z_i = 0.5 + (rng.normal(size=(n, dim)) * scales) @ basis.T
  z_t = z_i + 0.3 * rng.normal(size=(n, dim))
  return z_i.astype(np.float32), z_t.astype(np.float32)


def _text(batch: int, seed: int = 0, config=TINY):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.normal(size=(batch, config.num_text_tokens, config.text_width)), jnp.float32)
  lengths = rng.integers(1, config.num_text_tokens + 1, batch)
  mask = jnp.asarray(np.arange(config.num_text_tokens)[None] < lengths[:, None])
  z_t = jnp.asarray(rng.normal(size=(batch, config.clip_dim)), jnp.float32)
  return {"tokens": tokens, "mask": mask, "z_t": z_t}


def test_pca_keeps_the_top_variance_and_reconstructs_with_the_dropped_eigenvalues_as_error():
  """With every dimension and fine buckets the codes give z_i back; with K of D, the mean squared error
  over the fitting set is the sum of the dropped covariance eigenvalues (times (N - 1) / N)."""
  z_i, z_t = _embeddings(4000, 8)
  fine = dict(num_buckets=2 ** 20, code_range=8.0)
  full = dataclasses.replace(TINY, num_codes=8, **fine)
  codebook = ar_lib.fit_codebook(full, z_i, z_t)
  back = ar_lib.from_codes(codebook, ar_lib.to_codes(codebook, z_i, full), full)
  np.testing.assert_allclose(back, z_i, atol=2e-4)
  eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(z_i.astype(np.float64), rowvar=False)))[::-1]
  np.testing.assert_allclose(np.asarray(codebook["scale"]) ** 2, eigenvalues, rtol=1e-4)
  components = np.asarray(codebook["components"])
  np.testing.assert_allclose(components @ components.T, np.eye(8), atol=1e-5)

  part = dataclasses.replace(TINY, num_codes=3, **fine)
  codebook = ar_lib.fit_codebook(part, z_i, z_t)
  back = ar_lib.from_codes(codebook, ar_lib.to_codes(codebook, z_i, part), part)
  mse = np.mean(np.sum((np.asarray(back, np.float64) - z_i) ** 2, axis=1))
  np.testing.assert_allclose(mse, eigenvalues[3:].sum() * (len(z_i) - 1) / len(z_i), rtol=1e-3)


def test_buckets_round_trip_and_bound_the_quantisation_error():
  """codes -> z_i -> codes is the identity; a coordinate inside +-code_range moves at most half a bucket
  (code_range / num_buckets standard deviations) and one outside is clipped to the end bucket."""
  z_i, z_t = _embeddings(500, 8)
  codebook = ar_lib.fit_codebook(TINY, z_i, z_t)
  codes = jnp.asarray(np.random.default_rng(1).integers(0, TINY.num_buckets, (50, TINY.num_codes)), jnp.int32)
  np.testing.assert_array_equal(ar_lib.to_codes(codebook, ar_lib.from_codes(codebook, codes, TINY), TINY), codes)

  coords = lambda z: (z - codebook["mean"]) @ codebook["components"].T / codebook["scale"]  # [N, K]
  y = np.asarray(coords(z_i))
  y_back = np.asarray(coords(ar_lib.from_codes(codebook, ar_lib.to_codes(codebook, z_i, TINY), TINY)))
  inside = np.abs(y) < TINY.code_range
  assert inside.mean() > 0.99
  assert np.abs(y - y_back)[inside].max() <= TINY.code_range / TINY.num_buckets * (1 + 1e-3)
  far = np.asarray(ar_lib.to_codes(codebook, codebook["mean"] + 100 * codebook["scale"][:, None]
                                   * codebook["components"], TINY))
  assert np.all(np.diag(far) == TINY.num_buckets - 1)  # each direction's far point: its last bucket


def test_the_dot_token_splits_the_training_pairs_into_equal_quantiles():
  z_i, z_t = _embeddings(4000, 8)
  codebook = ar_lib.fit_codebook(TINY, z_i, z_t)
  counts = np.bincount(np.asarray(ar_lib.dot_bucket(codebook, z_t, z_i)), minlength=TINY.num_dot_buckets)
  assert len(counts) == TINY.num_dot_buckets
  np.testing.assert_allclose(counts / len(z_i), 1 / TINY.num_dot_buckets, atol=0.002)


def _variables(config=TINY, seed=0):
  return ar_lib.init_variables(config, jax.random.key(seed))


def test_each_code_sees_only_the_codes_before_it_and_the_unpadded_text():
  variables, text = _variables(), _text(3)
  model = ar_lib.ARPrior(TINY)
  dot = jnp.array([0, 2, TINY.num_dot_buckets])
  codes = jnp.asarray(np.random.default_rng(0).integers(0, TINY.num_buckets, (3, TINY.num_codes)))
  logits = lambda c, tokens=text["tokens"]: model.apply(variables, tokens, text["mask"], text["z_t"], dot, c)
  base = logits(codes)
  for k in range(TINY.num_codes):
    changed = logits(codes.at[:, k].set((codes[:, k] + 1) % TINY.num_buckets))
    np.testing.assert_allclose(changed[:, :k + 1], base[:, :k + 1], atol=1e-6)  # code k predicts from < k
    if k + 1 < TINY.num_codes:
      assert np.abs(changed[:, k + 1:] - base[:, k + 1:]).max() > 1e-4  # and later codes read it
  padded = jnp.where(text["mask"][..., None], text["tokens"], 100.0)
  np.testing.assert_allclose(logits(codes, padded), base, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sampling_with_the_cache_equals_teacher_forcing(scan_layers):
  config = dataclasses.replace(TINY, scan_layers=scan_layers)
  variables, text = _variables(config), _text(2, config=config)
  dot = jnp.array([1, 3])
  codes = jnp.asarray(np.random.default_rng(2).integers(0, config.num_buckets, (2, config.num_codes)))
  full = ar_lib.ARPrior(config).apply(variables, text["tokens"], text["mask"], text["z_t"], dot, codes)
  cached = ar_lib.ARPrior(config, cache_length=config.seq_len)
  logits, cache = cached.apply(variables, text["tokens"], text["mask"], text["z_t"], dot, method="prefill",
                               mutable=["cache"])
  steps = [logits]
  key_valid = ar_lib.valid_keys(text["mask"], config)
  for k in range(config.num_codes - 1):
    logits, cache = cached.apply(dict(variables, **cache), codes[:, k], config.prefix_len + k, key_valid,
                                 method="step", mutable=["cache"])
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, 1), full, atol=2e-5)


def test_scanned_and_unscanned_params_convert_and_compute_the_same():
  variables, text = _variables(), _text(2)
  scanned_config = dataclasses.replace(TINY, scan_layers=True)
  scanned = scan_layout.to_scanned(variables, scanned_config)
  assert scan_layout.is_scanned(scanned, scanned_config) and not scan_layout.is_scanned(variables, TINY)
  args = (text["tokens"], text["mask"], text["z_t"], jnp.array([0, 1]), jnp.zeros((2, TINY.num_codes), jnp.int32))
  np.testing.assert_allclose(ar_lib.ARPrior(scanned_config).apply(scanned, *args),
                             ar_lib.ARPrior(TINY).apply(variables, *args), atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, scan_layout.to_unscanned(scanned, TINY), variables)


def _sampler(config=TINY, **kwargs):
  model = ar_lib.ARPrior(config, cache_length=config.seq_len)
  return jax.jit(lambda v, c, u, r, dot=None: ar_stage.sample_ar_prior(model, v, c, u, r, dot=dot, **kwargs))


def _uncond(config=TINY):
  return {k: v[:1] for k, v in _text(1, seed=9, config=config).items()}


def test_guidance_zero_samples_the_unconditional_model_and_rows_are_independent():
  """Guided logits are uncond + s (cond - uncond): at s = 0 the draws (same keys) are those of an
  unguided run on the empty caption with the "none" dot token. Each row's draws depend on its own key
  only, so a prompt's z_i is the same alone and in a batch."""
  z_i, z_t = _embeddings(200, 8)
  variables = dict(_variables(), codebook=ar_lib.fit_codebook(TINY, z_i, z_t))
  cond, uncond = _text(3), _uncond()
  keys = jax.random.split(jax.random.key(4), 3)
  at_zero = _sampler(guidance_scale=0.0, num_candidates=1)(variables, cond, uncond, keys)
  none = jnp.full((3,), TINY.num_dot_buckets)
  as_uncond = {k: jnp.repeat(v, 3, axis=0) for k, v in uncond.items()}
  unguided = _sampler(guidance_scale=1.0, num_candidates=1)(variables, as_uncond, uncond, keys, none)
  np.testing.assert_allclose(at_zero, unguided, atol=1e-5)

  guided = _sampler(guidance_scale=3.0, num_candidates=2)
  rows = jax.random.split(jax.random.key(5), 6)
  together = guided(variables, cond, uncond, rows)
  alone = guided(variables, {k: v[1:2] for k, v in cond.items()}, uncond, rows[2:4])
  np.testing.assert_allclose(alone[0], together[1], atol=1e-5)
  assert not np.allclose(together[0], together[1])


def test_a_tiny_model_overfits_a_batch_and_samples_its_codes_back():
  """Trained on four (caption, z_i) pairs, the loss goes near zero and near-greedy sampling (temperature
  0.01, no guidance, each pair's own dot token) returns each pair's z_i as its codes give it."""
  config = dataclasses.replace(TINY, num_codes=5, num_buckets=16)
  z_i, z_t = _embeddings(64, 8, seed=3)
  codebook = ar_lib.fit_codebook(config, z_i, z_t)
  text = _text(4, seed=1, config=config)
  batch = dict(text, z_t=jnp.asarray(z_t[:4]), z_i=jnp.asarray(z_i[:4]))
  model = ar_lib.ARPrior(config)
  loss_fn = lambda p, r: ar_stage.ar_prior_loss(p, batch, r, model=model, codebook=codebook, uncond=_uncond(config),
                                                p_uncond=0.0)[0]
  params = _variables(config)["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def train(params, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  first = None
  for step in range(300):
    params, opt_state, loss = train(params, opt_state, jax.random.key(step))
    first = float(loss) if first is None else first
  assert first > 2.0 and float(loss) < 0.05, (first, float(loss))

  codes = ar_lib.to_codes(codebook, batch["z_i"], config)
  dot = ar_lib.dot_bucket(codebook, batch["z_t"], batch["z_i"])
  sampled = _sampler(config, guidance_scale=1.0, num_candidates=1, temperature=0.01)(
      {"params": params, "codebook": codebook}, text | {"z_t": batch["z_t"]}, _uncond(config),
      jax.random.split(jax.random.key(0), 4), dot)
  np.testing.assert_allclose(sampled, ar_lib.from_codes(codebook, codes, config), atol=1e-5)
