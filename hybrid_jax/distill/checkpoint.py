"""Training checkpoints with orbax: parameters, optimiser state and a JSON record of progress.

Layout: `<workdir>/checkpoints/<step>/{params,opt_state,meta}` where `step` is the global
step. `params` holds every student parameter as a nested dict (path components as keys);
`opt_state` the optimiser state's leaves as a list (its structure comes from the stage's
optimiser at restore time); `meta` the stage index, the step within the stage, the data
iterator's state and the non-finite counters.

Crash safety comes from orbax: a save is written to a temporary directory and renamed to
`<step>` only once every item is complete (atomic finalize), and `latest_step` lists only
finalized steps, so a killed save leaves nothing that restores. Saves are asynchronous:
`save` returns once arrays are copied off the device; `wait` blocks until files are final.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


def nest(flat: Mapping[str, object]) -> dict:
    """{"a/b/c": x} → {"a": {"b": {"c": x}}}."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def unnest(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(unnest(v, p + "/"))
        else:
            out[p] = v
    return out


def encode_data_state(state):
    """A data iterator's state as JSON (bytes, as grain returns them, are base64-wrapped)."""
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode("ascii")}
    return jax.tree.map(lambda x: x.item() if isinstance(x, np.generic) else x, state)


def decode_data_state(state):
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


class Checkpointer:
    """Save / restore training state under `directory`, keeping the last `keep` steps."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts, item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, params: Mapping[str, jax.Array], opt_state, meta: dict) -> None:
        """Start saving (asynchronously); `params` is a flat {path: array} dict."""
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(nest(params)),
                opt_state=ocp.args.StandardSave({"leaves": jax.tree.leaves(opt_state)}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore_meta(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, params_like: Mapping[str, jax.Array], opt_state_like=None):
        """(params {path: array}, opt_state or None, meta); `*_like` give shapes, dtypes and shardings.

        `opt_state_like` is the freshly initialised optimiser state of the stage being resumed
        (None when the saved stage was complete and its optimiser state is not needed).
        """
        args = dict(params=ocp.args.StandardRestore(nest({p: _abstract(v) for p, v in params_like.items()})), meta=ocp.args.JsonRestore())
        if opt_state_like is not None:
            leaves, treedef = jax.tree.flatten(opt_state_like)
            args["opt_state"] = ocp.args.StandardRestore({"leaves": [_abstract(x) for x in leaves]})
        out = self._mgr.restore(step, args=ocp.args.Composite(**args))
        params = unnest(out["params"])
        missing = sorted(set(params_like) - set(params))
        if missing:
            raise ValueError(f"checkpoint {self.directory}/{step} lacks parameters {missing[:5]}; it was written for another model")
        opt_state = None
        if opt_state_like is not None:
            opt_state = jax.tree.unflatten(treedef, out["opt_state"]["leaves"])
        return params, opt_state, out["meta"]

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
