"""One device mesh ("data", "fsdp", "tensor") and logical-axis rules for parameters and batches.

Parameters carry logical axis names (`hybrid_jax/layers/params.py`); `RULES` maps each to a
mesh axis. A dimension stays replicated when its size does not divide the mesh axis or the
mesh axis is already used by an earlier dimension of the same array, so the same code runs
on 1 CPU, 8 GPUs or a TPU pod. Batches shard their leading dimension over data × fsdp.

Multi-host (TPU VM slices, several GPU hosts): call `initialize_distributed()` first in every
process (before any other JAX call); each host then feeds its own slice of the global batch
and `shard_batch` assembles the global arrays.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis → mesh axis (None: replicated)
RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "conv": None,
    "norm": None,
    "layers": None,
}


def initialize_distributed() -> None:
    """Join a multi-process run: `jax.distributed.initialize()` auto-detects TPU VMs, SLURM and
    Open MPI; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    kw = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kw = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kw)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one entry may be -1 to take the remaining devices."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh: {dict(zip(MESH_AXES, sizes, strict=True))} cannot fill {num_devices} devices ({num_devices} is not a multiple of {fixed})")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data×fsdp×tensor = {math.prod(sizes)} but {num_devices} devices are in use; make the product equal or set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg or {"data": 1, "fsdp": -1, "tensor": 1}, len(devices))
    if len(devices) == len(jax.devices()):
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str | None] = RULES) -> P:
    """PartitionSpec for an array with logical `axes` (None or missing: replicated)."""
    if axes is None:
        return P()
    out, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        ax = rules.get(name) if name is not None else None
        if ax is None or ax in used or dim % mesh.shape[ax]:
            out.append(None)
        else:
            out.append(ax)
            used.add(ax)
    return P(*out)


def variable_sharding(variable, mesh: Mesh, rules: Mapping[str, str | None] = RULES) -> NamedSharding:
    axes = variable.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(axes, np.shape(variable.get_value()), mesh, rules))


def state_shardings(state, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
    """A pytree like `state` (an nnx.State) with a NamedSharding per array."""
    from flax import nnx

    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh, rules)), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
    """Place every array of an nnx.State on the mesh by its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def shard_model(model, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
    """Move an nnx model's variables onto the mesh in place; returns the model."""
    from flax import nnx

    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's rows) → global arrays sharded over data×fsdp."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        rows = v.shape[0] * jax.process_count()
        if rows % n:
            raise ConfigError(f"batch: global batch size {rows} is not divisible by data×fsdp = {n}; change train.batch_size or the mesh")
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


# Dimension roles of per_shard and constrain: batch dimensions split over data × fsdp, head
# (and vocabulary) dimensions over tensor.
SHARD_ROLES: dict[str, tuple[str, ...]] = {"b": BATCH_AXES, "h": ("tensor",)}


def _multi_device_mesh():
    """The ambient mesh (`jax.set_mesh`) when it spans several devices, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.shape.values()) == 1 else mesh


def mesh_axis_size(name: str) -> int:
    """Size of axis `name` of the ambient mesh (1 without a mesh or without that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(name, 1)


def _role_specs(mesh, arrays: Mapping[str, jax.Array], dims: Mapping[str, str]):
    """spec(roles) -> PartitionSpec: a role is split over its mesh axes only where every
    dimension of `arrays` playing it divides by their size."""
    mesh_axes = {role: tuple(a for a in axes if a in mesh.shape) for role, axes in SHARD_ROLES.items()}
    split = {}
    for role, axes in mesh_axes.items():
        size = math.prod(mesh.shape[a] for a in axes)
        lengths = [a.shape[i] for n, a in arrays.items() for i, r in enumerate(dims[n]) if r == role]
        split[role] = size > 1 and all(n % size == 0 for n in lengths)

    def spec(roles: str) -> P:
        return P(*[mesh_axes[r] if split.get(r) else None for r in roles])

    return spec


def constrain(x: jax.Array, roles: str) -> jax.Array:
    """x pinned to its dimensions' roles ('b', 'h' or whole, as in `per_shard`) under the
    ambient mesh; x itself without a mesh of several devices.

    Parameters shard their embedding dimension over fsdp. Left unconstrained, XLA's SPMD
    partitioner may contract that sharded dimension in place, gathering the batch and
    reducing partial sums at every matmul, so each device works on every row (measured on two
    H200s: no faster than one). Pinning the residual stream to batch rows makes it gather
    the parameters instead (FSDP)."""
    mesh = _multi_device_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, _role_specs(mesh, {"x": x}, {"x": roles})(roles))


def per_shard(fn, arrays: Mapping[str, jax.Array | None], dims: Mapping[str, str], out_dims):
    """fn(**arrays), run once per shard of the ambient mesh (`jax.set_mesh`; the trainer sets it).

    Pallas kernels are custom calls that XLA's SPMD partitioner cannot split: left to it, their
    inputs are all-gathered and every device computes the whole batch. Kernels see only
    independent (batch row, head) work, so they run on each device's rows and heads instead.
    `dims[name]` gives each dimension of arrays[name] a role: 'b' (batch: data × fsdp), 'h'
    (heads: tensor) or any other letter (kept whole). A role is split only where every
    dimension playing it divides by its mesh size; otherwise it stays whole (replicated, still
    correct). `out_dims` is a pytree of such strings matching fn's output (arrays only). None
    entries of `arrays` are passed through as None. Without a mesh of several devices this is
    fn(**arrays)."""
    mesh = _multi_device_mesh()
    if mesh is None:
        return fn(**arrays)
    present = {n: a for n, a in arrays.items() if a is not None}
    absent = {n: None for n, a in arrays.items() if a is None}
    spec = _role_specs(mesh, present, dims)
    in_specs = ({n: spec(dims[n]) for n in present},)
    out_specs = jax.tree.map(spec, out_dims)
    return jax.shard_map(lambda kw: fn(**kw, **absent), mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)(present)
