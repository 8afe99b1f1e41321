"""The multi-stage trainer: one jitted step per stage with the teacher inside it.

    trainer = Trainer(config, student, teacher=teacher, data_fn=make_iterator, workdir=DIR)
    summary = trainer.run()          # trains every stage of config.stage_order, in order

`data_fn(stage_cfg)` returns this process's batch iterator for a resolved stage config
(`config.resolved_stage`): dicts of numpy arrays input_ids, segment_ids, positions,
loss_mask of shape [batch_size / process_count, seq_len], with `get_state()` /
`set_state(state)` so a resumed run continues at the same batch.

State is kept functionally: the student's parameters are a flat dict {path: fp32 array}
split per stage into trainable and frozen parts; only the trainable part reaches the
optimiser (frozen parameters have no optimiser state and cannot change). A step whose loss
or gradient norm is not finite applies no update (parameters and optimiser state are kept);
`train.max_nonfinite` such steps in a row stop the run with `NonFiniteError`, leaving the
checkpoints written so far. Rerunning on the same workdir restores the latest checkpoint
(parameters, optimiser state, stage, step, data-iterator state) and continues; the result
equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ConfigError, check_seq_len, resolved_stage, stage_names
from hybrid_jax.distill import freeze
from hybrid_jax.distill.checkpoint import Checkpointer, decode_data_state, encode_data_state
from hybrid_jax.distill.metrics import MetricsWriter
from hybrid_jax.distill.optim import current_lr, make_optimizer
from hybrid_jax.distill.stages import Stage, build_stage, count_tokens, layer_kinds, new_layers
from hybrid_jax.sharding import logical_to_spec, make_mesh, shard_batch

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


class FlatParams:
    """A flat {path: array} view of an nnx.State of parameters, and the way back."""

    def __init__(self, state):
        pairs, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.paths = ["/".join(_key_str(k) for k in path) for path, _ in pairs]
        self.axes = {p: v.get_metadata().get("out_sharding") for p, (_, v) in zip(self.paths, pairs, strict=True)}
        leaves, self.treedef = jax.tree.flatten(state)
        if len(leaves) != len(self.paths):
            raise ValueError("FlatParams: every parameter must be a Variable holding one array")
        self.values = dict(zip(self.paths, leaves, strict=True))

    def unflatten(self, flat: Mapping[str, jax.Array]):
        return jax.tree.unflatten(self.treedef, [flat[p] for p in self.paths])

    def shardings(self, mesh) -> dict[str, NamedSharding]:
        return {p: NamedSharding(mesh, logical_to_spec(self.axes[p], np.shape(v), mesh)) for p, v in self.values.items()}


def pipeline_data_fn(config, tokenizer) -> Callable:
    """A `data_fn` over `hybrid_jax.data.pipeline.make_batches`: each stage reads its resolved
    `data` section; each host gets its batch_size / process_count rows (and its own shard)."""
    from hybrid_jax.data.pipeline import make_batches

    def data_fn(stage):
        if stage.batch_size % jax.process_count():
            raise ConfigError(f"stage {stage.name!r}: batch_size {stage.batch_size} is not divisible by the {jax.process_count()} processes")
        return make_batches(stage.data, tokenizer, seq_len=stage.seq_len, batch_size=stage.batch_size // jax.process_count(), seed=config.seed)

    return data_fn


def _all_process_states(state) -> list:
    """Every process's (JSON) data-iterator state, in process order: each host reads its own shard."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(blobs[i, : sizes[i]]).decode()) for i in range(len(sizes))]


def _close(it) -> None:
    if callable(getattr(it, "close", None)):
        it.close()


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def accumulated_value_and_grad(grad_fn, loss_weight, accum: int):
    """grad_fn(params, *args, batch) -> ((loss, metrics), grads), over the batch in `accum`
    microbatches through one scan.

    Each microbatch's loss, metrics and gradient are weighted by `loss_weight(microbatch)`, the
    positions its loss averages over, so the result is the whole batch's mean even where rows
    hold different numbers of loss positions; "target_tokens" is summed. Microbatch i takes
    rows i, i + accum, ...: under a mesh each device keeps its own rows in every microbatch."""

    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    def fn(params, *args):
        *args, batch = args
        micro = jax.tree.map(split, batch)

        def body(carry, mb):
            sums, total = carry
            w = loss_weight(mb)
            sums = jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), sums, grad_fn(params, *args, mb))
            return (sums, total + w), None

        shapes = jax.eval_shape(grad_fn, params, *args, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
        ((loss, metrics), grads), total = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)[0]
        inv = 1.0 / jnp.maximum(total, 1.0)
        metrics = {k: total if k == "target_tokens" else v * inv for k, v in metrics.items()}
        grads = jax.tree.map(lambda g, p: (g * inv).astype(p.dtype), grads, params)
        return (loss * inv, metrics), grads

    return fn


class Trainer:
    def __init__(
        self,
        config,
        student: nnx.Module,
        *,
        data_fn: Callable,
        workdir: str,
        teacher: nnx.Module | None = None,
        mesh=None,
        step_hook: Callable[[nnx.Module, int], None] | None = None,
        print_fn: Callable[[str], None] = print,
    ):
        """`step_hook(student, global_step)` runs before every step and may change the student's
        static attributes (e.g. AllMem's window/sinks/chunk via `set_allmem_hparams`); each
        distinct configuration compiles once. Derive any randomness from the step so a resumed
        run draws the same values."""
        self.config = config
        self.student = student
        self.teacher = teacher
        self.data_fn = data_fn
        self.step_hook = step_hook
        self.workdir = os.path.abspath(workdir)
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh)
        self.names = stage_names(config)
        self.stage_cfgs = [resolved_stage(config, n) for n in self.names]
        self.stages: list[Stage] = [build_stage(c, student, teacher) for c in self.stage_cfgs]
        self._print = print_fn if jax.process_index() == 0 else (lambda *_: None)
        self.kinds = layer_kinds(student)
        self.new = new_layers(student, teacher) if teacher is not None else ()
        accum = config.train.grad_accum
        if accum < 1:
            raise ConfigError(f"config: train.grad_accum must be > 0, got {accum}")
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        for st in self.stages:
            for model, what in ((student, "student"), (teacher, "teacher")):
                limit = _max_positions(model) if model is not None else None
                if limit is not None:
                    check_seq_len(st.seq_len, limit, what=f"stages.{st.name} seq_len (the {what}'s)")
            if st.batch_size % (accum * rows):
                raise ConfigError(
                    f"stage {st.name!r}: batch_size {st.batch_size} does not split into train.grad_accum={accum} microbatches "
                    f"of whole rows on each of the data×fsdp = {rows} devices; make batch_size a multiple of {accum * rows}"
                )

    # ------------------------------------------------------------------ data

    def _check_batch(self, stage: Stage, batch) -> None:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ConfigError(f"stage {stage.name!r}: batches lack {missing}; the data pipeline must yield {list(BATCH_KEYS)}")
        rows = stage.batch_size // jax.process_count()
        want = (rows, stage.seq_len)
        for k in BATCH_KEYS:
            if np.shape(batch[k]) != want:
                raise ConfigError(f"stage {stage.name!r}: batch[{k!r}] has shape {np.shape(batch[k])}, expected {want} (batch_size/process_count, seq_len)")

    def _check_data(self, stage: Stage) -> None:
        it = self.data_fn(stage.cfg)
        for m in ("get_state", "set_state"):
            if not callable(getattr(it, m, None)):
                raise ConfigError(f"stage {stage.name!r}: the data iterator has no {m}(); resuming needs get_state/set_state")
        try:
            first = next(it)
        except StopIteration:
            raise ConfigError(f"stage {stage.name!r}: dataset {dict(stage.cfg.data)} is empty (yields no batch); check data.source / data.path") from None
        finally:
            _close(it)
        self._check_batch(stage, first)

    # ------------------------------------------------------------------ step

    def _make_step(self, stage: Stage, tx, sched, graphdef, flat: FlatParams, shardings):
        t_graphdef = self._t_graphdef

        def loss_fn(trainable, frozen, rest, t_params, t_rest, batch):
            student = nnx.merge(graphdef, flat.unflatten({**frozen, **trainable}), rest)
            teacher = nnx.merge(t_graphdef, t_params, t_rest) if stage.needs_teacher else None
            return stage.compute_loss(student, teacher, batch)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if self.config.train.grad_accum > 1:
            grad_fn = accumulated_value_and_grad(grad_fn, stage.loss_weight, self.config.train.grad_accum)

        def step(trainable, frozen, rest, opt_state, t_params, t_rest, batch):
            (loss, metrics), grads = grad_fn(trainable, frozen, rest, t_params, t_rest, batch)
            gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
            finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
            lr = current_lr(opt_state, sched)
            updates, new_opt = tx.update(grads, opt_state, trainable)
            new_params = optax.apply_updates(trainable, updates)
            keep = lambda new, old: jnp.where(finite, new, old)
            new_params = jax.tree.map(keep, new_params, trainable)
            new_opt = jax.tree.map(keep, new_opt, opt_state)
            metrics = {**metrics, "grad_norm": gnorm, "lr": lr, "finite": finite}
            return new_params, new_opt, metrics

        tr_sh, opt_sh = shardings
        replicated = NamedSharding(self.mesh, P())
        return jax.jit(step, out_shardings=(tr_sh, opt_sh, replicated), donate_argnums=(0, 3))

    def _opt_shardings(self, tx, trainable, tr_sh):
        abstract = jax.eval_shape(tx.init, trainable)
        replicated = NamedSharding(self.mesh, P())
        return optax.tree_map_params(tx, lambda _, s: s, abstract, tr_sh, transform_non_params=lambda _: replicated)

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        # On several devices the ambient mesh lets the layers run their Pallas kernels per device
        # shard (sharding.per_shard) inside the jitted steps; one device needs no mesh for that.
        several = self.mesh.devices.size > 1
        with jax.set_mesh(self.mesh) if several else contextlib.nullcontext():
            return self._run()

    def _run(self) -> dict:
        cfg = self.config
        mesh = self.mesh
        graphdef, p_state, rest = nnx.split(self.student, nnx.Param, ...)
        flat = FlatParams(p_state)
        p_sh = flat.shardings(mesh)
        replicated = NamedSharding(mesh, P())
        # Fresh buffers from a jitted copy: the trained buffers are donated to the step, and a
        # student cloned from the teacher would otherwise share them with the teacher's
        # parameters (device_put may reuse the source buffer for one shard even with may_alias=False).
        params = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=p_sh)(flat.values)
        rest = jax.device_put(rest, replicated)
        self._t_graphdef = t_params = t_rest = None
        if self.teacher is not None and any(s.needs_teacher for s in self.stages):
            self._t_graphdef, tp_state, t_rest = nnx.split(self.teacher, nnx.Param, ...)
            t_flat = FlatParams(tp_state)
            t_sh = t_flat.shardings(mesh)
            t_params = t_flat.unflatten({p: jax.device_put(v, t_sh[p]) for p, v in t_flat.values.items()})
            t_rest = jax.device_put(t_rest, replicated)

        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints)
        latest = ckpt.latest_step()
        meta = None
        start_idx, start_step, global_step = 0, 0, 0
        if latest is not None:
            meta = ckpt.restore_meta(latest)
            if list(meta["stage_names"][: meta["stage_index"] + 1]) != list(self.names[: meta["stage_index"] + 1]):
                raise ConfigError(
                    f"workdir {self.workdir} holds a run with stages {meta['stage_names']}; this run asks for {list(self.names)}. "
                    "Use a fresh --workdir (or the same stage_order) to resume"
                )
            global_step = meta["global_step"]
            start_idx, start_step = meta["stage_index"], meta["stage_step"]
            if meta["stage_done"]:
                start_idx, start_step = start_idx + 1, 0
            self._print(f"resuming from {ckpt.directory}/{latest}: stage {meta['stage_name']!r} step {meta['stage_step']}, global step {global_step}")
        for st in self.stages[start_idx:]:
            self._check_data(st)

        writer = MetricsWriter(self.workdir, resume_step=latest, tensorboard=cfg.train.tensorboard)
        nonfinite_total = meta["nonfinite_total"] if meta else 0
        summary: dict = {"stages": {}}
        it = None
        try:
            if latest is not None and start_step == 0:  # resume at a stage boundary: parameters only
                params, _, _ = ckpt.restore(latest, params)
            for idx in range(start_idx, len(self.stages)):
                stage = self.stages[idx]
                c = stage.cfg
                train_paths = freeze.trainable_paths(
                    flat.paths, c.trainable, c.freeze, layer_kinds=self.kinds, new_layers=self.new, aligned=stage.layers, stage=stage.name
                )
                not_fp32 = [p for p in train_paths if params[p].dtype != jnp.float32]
                if not_fp32:
                    raise ConfigError(f"stage {stage.name!r}: trained parameters must be float32 master weights, {not_fp32[:3]} are not; build the student with param_dtype=float32")
                sizes = {p: int(np.prod(np.shape(v))) for p, v in params.items()}
                self._print(freeze.trainable_table(sizes, train_paths, layer_kinds=self.kinds, title=f"stage {idx + 1}/{len(self.stages)} {stage.name!r} ({stage.type}, {stage.steps} steps)"))
                tx, sched = make_optimizer(c, stage.steps, train_paths)
                trainable = {p: params[p] for p in train_paths}
                frozen = {p: v for p, v in params.items() if p not in trainable}
                tr_sh = {p: p_sh[p] for p in train_paths}
                opt_sh = self._opt_shardings(tx, trainable, tr_sh)
                # One buffer per leaf (may_alias=False): equal zero leaves may otherwise share a
                # buffer, which the donating step would then receive twice.
                opt_state = jax.tree.map(lambda x, s: jax.device_put(x, s, may_alias=False), tx.init(trainable), opt_sh)
                it = self.data_fn(c)
                k0 = 0
                nonfinite_streak = 0
                window = [0.0, 0]  # sum and count of finite losses since the last log line
                if latest is not None and idx == start_idx and start_step > 0:
                    params, opt_state, _ = ckpt.restore(latest, params, opt_state)
                    trainable = {p: params[p] for p in train_paths}
                    frozen = {p: v for p, v in params.items() if p not in trainable}
                    states = meta["data_state"]
                    if len(states) != jax.process_count():
                        raise ConfigError(f"checkpoint {latest} was written by {len(states)} processes, this run has {jax.process_count()}; resume with the same host count")
                    it.set_state(decode_data_state(states[jax.process_index()]))
                    k0, nonfinite_streak, window = start_step, meta["nonfinite_streak"], list(meta["loss_window"])
                step_fns = {}  # graphdef -> jitted step (one per static configuration of the student)
                first_loss = last_loss = None
                pbar = _progress(cfg.train.progress and jax.process_index() == 0, stage, k0)
                t0, tokens = time.perf_counter(), 0
                for k in range(k0 + 1, stage.steps + 1):
                    try:
                        host_batch = next(it)
                    except StopIteration:
                        raise ConfigError(
                            f"stage {stage.name!r}: the data ran out after {k - 1} of {stage.steps} steps; make the pipeline repeat or lower the stage's steps/tokens"
                        ) from None
                    self._check_batch(stage, host_batch)
                    batch = shard_batch({key: host_batch[key] for key in BATCH_KEYS}, mesh)
                    tokens += count_tokens(host_batch) * jax.process_count()
                    if self.step_hook is not None:
                        self.step_hook(self.student, global_step + 1)
                        graphdef = nnx.graphdef(self.student)
                    if graphdef not in step_fns:
                        step_fns[graphdef] = self._make_step(stage, tx, sched, graphdef, flat, (tr_sh, opt_sh))
                    trainable, opt_state, m = step_fns[graphdef](trainable, frozen, rest, opt_state, t_params, t_rest, batch)
                    m = jax.device_get(m)
                    global_step += 1
                    finite = bool(m.pop("finite"))
                    nonfinite_streak = 0 if finite else nonfinite_streak + 1
                    nonfinite_total += 0 if finite else 1
                    loss = float(m["loss"])
                    if finite:
                        window = [window[0] + loss, window[1] + 1]
                    if pbar is not None:
                        pbar.update(1)
                    if k % cfg.train.log_every == 0 or k == stage.steps or not finite:
                        dt = time.perf_counter() - t0
                        tps = tokens / dt if dt > 0 else 0.0
                        extra = {"tokens_per_s": tps, "nonfinite_total": nonfinite_total}
                        if window[1]:
                            extra["loss_mean"] = window[0] / window[1]  # over the steps since the last line
                            first_loss = extra["loss_mean"] if first_loss is None else first_loss
                            last_loss = extra["loss_mean"]
                        window = [0.0, 0]
                        writer.write(global_step, {**m, **extra}, stage=stage.name, stage_step=k)
                        if pbar is not None:
                            pbar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tps:,.0f}")
                        t0, tokens = time.perf_counter(), 0
                    if nonfinite_streak >= cfg.train.max_nonfinite:
                        ckpt.wait()
                        good = ckpt.latest_step()
                        raise NonFiniteError(
                            f"stage {stage.name!r}: {nonfinite_streak} non-finite steps in a row (loss or gradient is NaN/inf), the last at global step {global_step}; "
                            f"stopping. The last good checkpoint is {f'{ckpt.directory}/{good}' if good is not None else 'none (no checkpoint written yet)'}; "
                            "lower the learning rate, check the data, or raise train.max_nonfinite"
                        )
                    if k % cfg.train.checkpoint_every == 0 or k == stage.steps:
                        params_now = {**frozen, **trainable}
                        ckpt.save(
                            global_step,
                            params_now,
                            opt_state,
                            dict(
                                global_step=global_step,
                                stage_index=idx,
                                stage_name=stage.name,
                                stage_step=k,
                                stage_done=k == stage.steps,
                                stage_names=list(self.names),
                                data_state=_all_process_states(encode_data_state(it.get_state())),
                                nonfinite_total=nonfinite_total,
                                nonfinite_streak=nonfinite_streak,
                                loss_window=window,
                            ),
                        )
                if pbar is not None:
                    pbar.close()
                _close(it)
                params = {**frozen, **trainable}
                summary["stages"][stage.name] = {"first_loss": first_loss, "last_loss": last_loss, "steps": stage.steps}
            ckpt.wait()
        finally:
            _close(it)  # stops a prefetching iterator's threads, also when a stage fails
            writer.close()
            ckpt.close()
        nnx.update(self.student, flat.unflatten(params))
        summary.update(global_step=global_step, nonfinite_total=nonfinite_total)
        return summary


def _progress(enabled: bool, stage: Stage, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=stage.steps, initial=initial, desc=stage.name, unit="step", dynamic_ncols=True)
