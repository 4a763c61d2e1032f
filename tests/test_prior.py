"""Diffusion prior: converted forward pass and guided sampling chain against
diffusers' PriorTransformer + UnCLIPScheduler (Karlo's settings), converter
errors, best-of-n, CFG dropout and a training run that fits a fixed batch."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PriorTransformer
from unclip_oracle import FixedNoise, float64_unclip_scheduler

from unclip_jax import optim, training
from unclip_jax.convert import common, diffusers_prior
from unclip_jax.diffusion import schedules
from unclip_jax.models import prior as prior_lib
from unclip_jax.stages import prior as stage
from unclip_jax.stages import text

DIM, TOKENS = 16, 77
# Karlo's prior options (diffusers' defaults, as in kakaobrain/karlo-v1-alpha/prior/config.json),
# shrunk to width 32 and 2 layers.
TINY_KARLO = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=DIM,
                  num_embeddings=TOKENS, additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu",
                  norm_in_type=None, embedding_proj_norm_type=None, encoder_hid_proj_type="linear",
                  added_emb_type="prd")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A tiny random diffusers prior with every parameter (including the zero-
  initialised positional / prd embeddings and clip stats) randomised."""
  torch.manual_seed(0)
  model = PriorTransformer(**TINY_KARLO).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
      p.copy_(base + 0.3 * torch.randn_like(p))
    model.clip_std.abs_().add_(0.5)
  folder = tmp_path_factory.mktemp("prior")
  model.save_pretrained(str(folder), safe_serialization=True)
  config, variables = diffusers_prior.load_diffusers_prior(str(folder))
  return dict(torch=model, folder=str(folder), config=config, variables=variables)


def _text(gen, batch, lengths):
  """Random stand-ins for CLIP's z_t, token encodings and padding mask."""
  z_t = torch.randn(batch, DIM, generator=gen)
  tokens = torch.randn(batch, TOKENS, DIM, generator=gen)
  mask = torch.arange(TOKENS)[None, :] < torch.tensor(lengths)[:, None]
  return z_t, tokens, mask


def _jnp(*tensors):
  return [jnp.asarray(t.numpy()) for t in tensors]


def test_config_conversion(reference):
  cfg = reference["config"]
  assert (cfg.width, cfg.num_layers, cfg.num_heads, cfg.clip_dim, cfg.num_text_tokens) == (32, 2, 2, DIM, TOKENS)
  assert cfg.prd_token and not cfg.norm_in and cfg.seq_len == TOKENS + 4


def test_forward_matches_diffusers(reference):
  gen = torch.Generator().manual_seed(1)
  batch = 4
  x_t = torch.randn(batch, DIM, generator=gen)
  z_t, tokens, mask = _text(gen, batch, [5, 77, 2, 30])  # padding in three rows; "" is 2 tokens
  t = torch.tensor([0, 17, 500, 999])
  with torch.no_grad():
    expected = reference["torch"](x_t, t, z_t, tokens, mask).predicted_image_embedding.numpy()
  model = prior_lib.DiffusionPrior(reference["config"])
  got = jax.jit(model.apply)(reference["variables"], *_jnp(x_t, t, z_t, tokens, mask))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  # the padding mask matters: unmasking row 0 changes its output
  unmasked = model.apply(reference["variables"], *_jnp(x_t, t, z_t, tokens, torch.ones_like(mask)))
  assert np.abs(np.asarray(unmasked)[0] - expected[0]).max() > 1e-3
  # post_process_latents is our denormalize
  with torch.no_grad():
    np.testing.assert_allclose(prior_lib.denormalize(reference["variables"], jnp.asarray(x_t.numpy())),
                               reference["torch"].post_process_latents(x_t).numpy(), rtol=1e-6, atol=1e-6)


def test_converter_names_missing_and_misshaped_tensors(reference):
  state = common.load_safetensors(reference["folder"])
  config = reference["config"]
  broken = dict(state)
  del broken["transformer_blocks.1.attn1.to_k.weight"]
  broken["proj_in.bias"] = np.zeros(7, np.float32)
  broken["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(common.ConversionError) as err:
    diffusers_prior.convert_state_dict(broken, config)
  msg = str(err.value)
  assert "'transformer_blocks.1.attn1.to_k.weight'" in msg
  assert "params/proj_in/bias: checkpoint shape (7,), model expects (32,)" in msg
  assert "unused tensor 'extra.weight'" in msg
  # a config the weights do not fit: one layer too many
  deeper = prior_lib.PriorConfig(**{**config.__dict__, "num_layers": 3})
  with pytest.raises(common.ConversionError, match="transformer_blocks.2.norm1.weight"):
    diffusers_prior.convert_state_dict(state, deeper)
  with pytest.raises(common.ConversionError, match="added_emb_type"):
    diffusers_prior.config_from_diffusers({**TINY_KARLO, "added_emb_type": "foo"})


def test_karlo_and_paper_configs_are_expressible():
  """Our Karlo config has exactly diffusers' parameter count for Karlo's prior
  (built on the meta device, no memory), and the paper's 24-layer prior is ~1.2B."""
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  karlo = jax.eval_shape(lambda: prior_lib.init_variables(prior_lib.karlo_config(), jax.random.key(0)))
  with torch.device("meta"):
    ref = PriorTransformer(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768)
  assert count(karlo) == sum(p.numel() for p in ref.parameters())
  paper = jax.eval_shape(lambda: prior_lib.init_variables(prior_lib.paper_config(), jax.random.key(0)))
  assert 1.1e9 < count(paper["params"]) < 1.3e9


def _float64_prior_scheduler(num_steps):
  """Karlo's prior scheduler, in float64 (see tests/unclip_oracle.py)."""
  return float64_unclip_scheduler(num_steps, variance_type="fixed_small_log", prediction_type="sample",
                                  clip_sample_range=5.0, num_train_timesteps=1000,
                                  beta_schedule="squaredcos_cap_v2")


def test_guided_sampling_matches_unclip_pipeline_loop(reference, fixed_unclip_noise):
  """UnCLIPPipeline's prior loop (batch [uncond, cond], guidance 4, 5 steps,
  post_process_latents) with the same initial and per-step noise."""
  num_steps, batch, scale = 5, 2, 4.0
  prior = reference["torch"]
  gen = torch.Generator().manual_seed(2)
  z_t, tokens, mask = _text(gen, batch, [6, 11])
  uz_t, utokens, umask = _text(gen, 1, [2])  # the empty prompt: BOS, EOS
  x_T = torch.randn(batch, DIM, generator=gen, dtype=torch.float64)
  noises = torch.randn(num_steps, batch, DIM, generator=gen, dtype=torch.float64)

  scheduler = _float64_prior_scheduler(num_steps)
  both = lambda u, c: torch.cat([u.expand(batch, *u.shape[1:]), c])
  prompt_embeds, hid, text_mask = both(uz_t, z_t), both(utokens, tokens), both(umask, mask)
  latents = x_T.clone()
  timesteps = scheduler.timesteps
  for i, t in enumerate(timesteps):
    with torch.no_grad():
      pred = prior(torch.cat([latents] * 2).float(), timestep=t, proj_embedding=prompt_embeds,
                   encoder_hidden_states=hid, attention_mask=text_mask).predicted_image_embedding
    pred_uncond, pred_text = pred.double().chunk(2)
    pred = pred_uncond + scale * (pred_text - pred_uncond)
    prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
    latents = scheduler.step(pred, timestep=t, sample=latents, generator=FixedNoise(noises[i]),
                             prev_timestep=prev).prev_sample
  with torch.no_grad():
    expected = prior.post_process_latents(latents.float()).numpy()

  cond = dict(zip(text.KEYS, _jnp(z_t, tokens, mask)))
  uncond = dict(zip(text.KEYS, _jnp(uz_t, utokens, umask)))
  model = prior_lib.DiffusionPrior(reference["config"])
  run = jax.jit(functools.partial(stage.sample_prior, model, num_steps=num_steps, guidance_scale=scale,
                                  num_candidates=1))
  got = run(reference["variables"], cond, uncond, jax.random.key(0), x_T=jnp.asarray(x_T.numpy(), jnp.float32),
            step_noise=jnp.asarray(noises.numpy(), jnp.float32))
  # float32 against a float64 scheduler: measured 1.3e-5 at |z| up to ~5
  np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)
  # the chain's respacing is the scheduler's
  np.testing.assert_array_equal(schedules.make_schedule("cosine", 1000, num_steps).timesteps[::-1],
                                timesteps.numpy())


def test_best_of_n_keeps_the_draw_closest_to_z_t(reference):
  model = prior_lib.DiffusionPrior(reference["config"])
  variables = reference["variables"]
  gen = torch.Generator().manual_seed(3)
  cond = dict(zip(text.KEYS, _jnp(*_text(gen, 3, [4, 9, 2]))))
  uncond = dict(zip(text.KEYS, _jnp(*_text(gen, 1, [2]))))
  n, steps = 2, 4
  key = jax.random.key(5)
  x_T = jax.random.normal(key, (3 * n, DIM))
  noise = jax.random.normal(jax.random.fold_in(key, 1), (steps, 3 * n, DIM))
  kwargs = dict(num_steps=steps, guidance_scale=3.0, x_T=x_T, step_noise=noise)
  best = stage.sample_prior(model, variables, cond, uncond, key, num_candidates=n, **kwargs)
  # all draws, as one batch of 6 prompts with one draw each
  rep = {k: jnp.repeat(v, n, axis=0) for k, v in cond.items()}
  draws = stage.sample_prior(model, variables, rep, uncond, key, num_candidates=1, **kwargs).reshape(3, n, DIM)
  scores = np.einsum("bnd,bd->bn", draws, cond["z_t"])
  assert set(np.argmax(scores, 1).tolist()) == {0, 1}  # both draws get picked somewhere
  np.testing.assert_allclose(best, draws[np.arange(3), np.argmax(scores, 1)], rtol=1e-5, atol=1e-5)
  assert np.all(np.einsum("bd,bd->b", best, cond["z_t"]) >= scores.max(1) - 1e-4)


def test_cfg_dropout_replaces_whole_examples_ten_percent_of_the_time():
  batch = 20000
  rng = np.random.default_rng(0)
  cond = {"z_t": jnp.asarray(rng.normal(size=(batch, 3))), "tokens": jnp.asarray(rng.normal(size=(batch, 4, 2))),
          "mask": jnp.ones((batch, 4), bool)}
  uncond = {"z_t": jnp.full((1, 3), 7.0), "tokens": jnp.full((1, 4, 2), -7.0),
            "mask": jnp.array([[True, True, False, False]])}
  out, dropped = text.drop(jax.random.key(0), cond, uncond, 0.1)
  dropped = np.asarray(dropped)
  assert abs(dropped.mean() - 0.1) < 0.01  # 5 standard errors
  np.testing.assert_array_equal(out["z_t"][dropped], np.full((dropped.sum(), 3), 7.0))
  np.testing.assert_array_equal(out["tokens"][dropped], np.full((dropped.sum(), 4, 2), -7.0))
  np.testing.assert_array_equal(out["mask"][dropped].sum(1), 2)
  np.testing.assert_array_equal(out["z_t"][~dropped], np.asarray(cond["z_t"])[~dropped])
  np.testing.assert_array_equal(out["mask"][~dropped], True)


def _tiny_batch(batch=8, dim=8, tokens=6, width=12, seed=0):
  rng = np.random.default_rng(seed)
  z_i = rng.normal(2.0, 3.0, (batch, dim)).astype(np.float32)  # not normalised: the stats do it
  data = {"z_i": z_i, "z_t": rng.normal(size=(batch, dim)).astype(np.float32),
          "tokens": rng.normal(size=(batch, tokens, width)).astype(np.float32),
          "mask": np.arange(tokens)[None] < rng.integers(2, tokens + 1, (batch, 1))}
  uncond = {"z_t": np.zeros((1, dim), np.float32), "tokens": rng.normal(size=(1, tokens, width)).astype(np.float32),
            "mask": np.arange(tokens)[None] < 2}
  return jax.tree.map(jnp.asarray, data), jax.tree.map(jnp.asarray, uncond)


def test_loss_is_x0_mse_in_normalised_space_with_dropout():
  config = prior_lib.PriorConfig(clip_dim=8, text_width=12, num_text_tokens=6, width=32, num_layers=1, num_heads=2)
  model = prior_lib.DiffusionPrior(config)
  batch, uncond = _tiny_batch()
  params = prior_lib.init_variables(config, jax.random.key(0))["params"]
  stats = stage.latent_stats(batch["z_i"])
  schedule = schedules.make_schedule("cosine", 1000)
  key = jax.random.key(3)
  loss_fn = jax.jit(functools.partial(stage.prior_loss, model=model, schedule=schedule, p_uncond=1.0))
  loss, metrics = loss_fn(params, batch, key, stats=stats, uncond=uncond)
  assert float(metrics["uncond_fraction"]) == 1.0
  # the same computation by hand, every example unconditional
  t_rng, noise_rng, _, _ = jax.random.split(key, 4)
  x0 = (batch["z_i"] - stats["clip_mean"]) / stats["clip_std"]
  i = jax.random.randint(t_rng, (8,), 0, 1000)
  noise = jax.random.normal(noise_rng, x0.shape)
  abar = schedule.alphas_cumprod[i][:, None]
  x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise
  u = {k: jnp.broadcast_to(v, (8,) + v.shape[1:]) for k, v in uncond.items()}
  pred = jax.jit(model.apply)({"params": params, "stats": stats}, x_t, i, u["z_t"], u["tokens"], u["mask"])
  np.testing.assert_allclose(loss, jnp.mean((pred - x0) ** 2), rtol=1e-5)


def test_tiny_prior_fits_a_fixed_batch():
  """Paper AdamW (lr raised for a short run), 10% CFG dropout: the conditional
  x0 loss, averaged over 256 fixed (t, noise) draws per example, falls below
  10% of its value at initialisation within 300 steps (measured: 2.4 -> 0.006, ~10 s)."""
  config = prior_lib.PriorConfig(clip_dim=8, text_width=12, num_text_tokens=6, width=64, num_layers=2, num_heads=4)
  model = prior_lib.DiffusionPrior(config)
  batch, uncond = _tiny_batch()
  stats = stage.latent_stats(batch["z_i"])
  schedule = schedules.make_schedule("cosine", 1000)
  params = prior_lib.init_variables(config, jax.random.key(0))["params"]
  tx = optim.paper_adamw("prior", learning_rate=2e-3)
  loss_fn = functools.partial(stage.prior_loss, model=model, stats=stats, schedule=schedule, uncond=uncond)
  step = jax.jit(training.make_train_step(loss_fn, tx, ema_decay=optim.PAPER_HPARAMS["prior"]["ema_decay"]))
  state = training.init_state(lambda rng: params, tx, jax.random.key(1))

  reps = {k: jnp.repeat(v, 256, axis=0) for k, v in batch.items()}
  eval_loss = jax.jit(lambda p: stage.prior_loss(p, reps, jax.random.key(99), model=model, stats=stats,
                                                 schedule=schedule, uncond=uncond, p_uncond=0.0)[0])
  start = float(eval_loss(state.params))
  t0 = time.time()
  for _ in range(300):
    state, metrics = step(state, batch)
  end = float(eval_loss(state.params))
  assert int(state.step) == 300 and np.isfinite(float(metrics["loss"]))
  assert end < 0.1 * start, (start, end, time.time() - t0)
  # the EMA moved (decay 0.9999 is slow, so only slightly) and the stats were never touched
  assert any(float(jnp.abs(e - p).max()) > 0 for e, p in zip(jax.tree.leaves(state.ema_params),
                                                              jax.tree.leaves(params)))


def test_bad_shapes_give_clear_errors(reference):
  model = prior_lib.DiffusionPrior(reference["config"])
  v = reference["variables"]
  x, t, z = jnp.zeros((2, DIM)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, DIM))
  tokens, mask = jnp.zeros((2, TOKENS, DIM)), jnp.ones((2, TOKENS), bool)
  with pytest.raises(ValueError, match=r"tokens must be \[B, 77, 16\]"):
    model.apply(v, x, t, z, tokens[:, :10], mask)
  with pytest.raises(ValueError, match=r"x_t and z_t must be \[B, 16\]"):
    model.apply(v, jnp.zeros((2, 8)), t, z, tokens, mask)
  cond = {"z_t": z, "tokens": tokens, "mask": mask}
  with pytest.raises(ValueError, match="missing"):
    stage.sample_prior(model, v, {"z_t": z}, cond, jax.random.key(0))
  with pytest.raises(ValueError, match=r"x_T must be \[B \* num_candidates, D\]"):
    stage.sample_prior(model, v, cond, cond, jax.random.key(0), x_T=jnp.zeros((2, DIM)))
  with pytest.raises(ValueError, match=r"uncond\['tokens'\] has shape \(1, 5, 16\)"):
    stage.sample_prior(model, v, cond, dict(cond, tokens=jnp.zeros((1, 5, DIM))), jax.random.key(0))
