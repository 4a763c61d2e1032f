"""The train state and the compiled, sharded train step shared by every stage."""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from unclip_jax import optim, parallel

# loss_fn(params, batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # uint32 key data, so that checkpoints hold plain arrays


def state_shardings(abstract_state: TrainState, mesh, rules=parallel.DEFAULT_RULES) -> TrainState:
  """Params, their optimizer moments and EMA split by the rules; step and rng replicated."""
  return TrainState(
      step=parallel.replicated(mesh),
      params=parallel.param_shardings(abstract_state.params, mesh, rules),
      opt_state=parallel.param_shardings(abstract_state.opt_state, mesh, rules),
      ema_params=parallel.param_shardings(abstract_state.ema_params, mesh, rules),
      rng=parallel.replicated(mesh))


def map_param_trees(state: TrainState, fn) -> TrainState:
  """fn applied to every params-shaped tree of the state: params, EMA and the optimizer's moments."""
  structure = jax.tree.structure(state.params)
  is_params = lambda x: jax.tree.structure(x) == structure
  opt_state = jax.tree.map(lambda x: fn(x) if is_params(x) else x, state.opt_state, is_leaf=is_params)
  return state.replace(params=fn(state.params), opt_state=opt_state, ema_params=fn(state.ema_params))


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng,
                       mesh, rules=parallel.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """Initialises the state directly into its shardings (never whole on one device)."""

  init = lambda r: init_state(init_params, tx, r)
  shardings = state_shardings(jax.eval_shape(init, rng), mesh, rules)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def abstract_state(init_params, tx, rng, shardings: TrainState):
  """ShapeDtypeStructs with shardings: the target for a sharded restore."""
  return with_shardings(jax.eval_shape(lambda r: init_state(init_params, tx, r), rng), shardings)


def with_shardings(shapes, shardings):
  """A tree of shapes (eval_shape's) as ShapeDtypeStructs carrying the matching shardings."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(init_params, tx, rng) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  params = init_params(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.key_data(state_rng))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, ema_decay: float,
                    learning_rate: optax.Schedule | float | None = None, grad_accum_steps: int = 1):
  """step(state, batch) -> (state, metrics), to be jitted with `jit_train_step`.

  With grad_accum_steps = A the batch is split into A micro-batches along its
  leading dimension and their mean gradient is applied once.
  """

  def grads_of(params, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    return grads, dict(metrics, loss=loss)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      grads, metrics = grads_of(state.params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

      def body(acc, inputs):
        index, mb = inputs
        g, m = grads_of(state.params, mb, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, acc, (g, m)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grads_of(state.params, jax.tree.map(lambda x: x[0], micro), rng)))
      (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    if learning_rate is not None:
      metrics["lr"] = learning_rate(state.step) if callable(learning_rate) else jnp.asarray(learning_rate)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=optim.ema_update(state.ema_params, params,
                                                         optim.ema_decay_at(state.step, ema_decay)))
    return new_state, metrics

  return step


def jit_train_step(step_fn, shardings: TrainState, mesh, rules=parallel.DEFAULT_RULES):
  """Explicit in/out shardings; the old state's buffers are donated to the new one.

  The step is traced under parallel.activation_sharding, so the models' activations
  stay split over the batch axes (parallel.constrain_batch).
  """

  def step_on_mesh(state, batch):
    with parallel.activation_sharding(mesh, rules):
      return step_fn(state, batch)

  return jax.jit(step_on_mesh, in_shardings=(shardings, parallel.batch_sharding(mesh, rules)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
