"""Which parameters a stage trains: named groups and regexes over parameter paths.

Parameter paths are the nnx state paths joined by "/", e.g. `blocks/3/mixer/q_proj`.
Groups:
  embeddings, lm_head, norms, mlp, mixers      by path component
  attention (= mixer:attention), mixer:<kind>  the mixer of every layer of that kind
  mixer:new                                    mixers of layers whose mixer replaces the teacher's
  aligned_mixers, aligned_blocks               the mixers / whole blocks an alignment stage aligns
  re:<regex>                                   any path matching the regex (re.search)
A stage trains `trainable` (all parameters when empty) minus `freeze`. Frozen parameters are
not passed to the optimiser at all, so they carry no optimiser state and cannot change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from hybrid_jax.config import MIXERS, ConfigError

# Where blocks and their mixers live in a model's parameter tree (DecoderLM: model.layers[i].mixer).
LAYERS_ATTR = "blocks"
MIXER_ATTR = "mixer"

_COMPONENT_GROUPS = {
    "embeddings": r"(^|/)(embed|embed_tokens|embedding|embeddings|wte)(/|$)",
    "lm_head": r"(^|/)lm_head(/|$)",
    "norms": r"(^|/)[^/]*norm[^/]*(/|$)",
    "mlp": r"(^|/)(mlp|ffn|feed_forward)(/|$)",
    "mixers": rf"(^|/){MIXER_ATTR}(/|$)",
}


def group_names() -> list[str]:
    kinds = [f"mixer:{k}" for k in MIXERS]
    return [*_COMPONENT_GROUPS, "attention", *kinds, "mixer:new", "aligned_mixers", "aligned_blocks", "re:<regex>"]


def _mixer_prefix(i: int) -> str:
    return f"{LAYERS_ATTR}/{i}/{MIXER_ATTR}/"


def _group_predicate(group: str, layer_kinds: Sequence[str], new_layers: Iterable[int], aligned: Iterable[int]):
    if group.startswith("re:"):
        try:
            rx = re.compile(group[3:])
        except re.error as e:
            raise ConfigError(f"freeze: bad regex {group[3:]!r}: {e}") from None
        return lambda p: rx.search(p) is not None
    if group in _COMPONENT_GROUPS:
        rx = re.compile(_COMPONENT_GROUPS[group])
        return lambda p: rx.search(p) is not None
    if group == "attention":
        group = "mixer:attention"
    if group == "aligned_blocks":
        prefixes = tuple(f"{LAYERS_ATTR}/{i}/" for i in aligned)
        return lambda p: p.startswith(prefixes)
    if group == "aligned_mixers":
        layers = sorted(set(aligned))
    elif group == "mixer:new":
        layers = sorted(set(new_layers))
    elif group.startswith("mixer:") and group[6:] in MIXERS:
        layers = [i for i, k in enumerate(layer_kinds) if k == group[6:]]
    else:
        raise ConfigError(f"freeze: unknown group {group!r}; known groups: {', '.join(group_names())}")
    prefixes = tuple(_mixer_prefix(i) for i in layers)
    return lambda p: p.startswith(prefixes)


def select(paths: Iterable[str], groups: Sequence[str], *, layer_kinds: Sequence[str] = (), new_layers: Iterable[int] = (),
           aligned: Iterable[int] = ()) -> set[str]:
    """Paths matched by any of the groups."""
    new_layers, aligned = list(new_layers), list(aligned)
    preds = [_group_predicate(g, layer_kinds, new_layers, aligned) for g in groups]
    return {p for p in paths if any(f(p) for f in preds)}


def trainable_paths(
    paths: Sequence[str],
    trainable: Sequence[str],
    freeze: Sequence[str],
    *,
    layer_kinds: Sequence[str] = (),
    new_layers: Iterable[int] = (),
    aligned: Iterable[int] = (),
    stage: str = "",
) -> list[str]:
    """Sorted paths a stage trains: `trainable` (all if empty) minus `freeze`."""
    kw = dict(layer_kinds=layer_kinds, new_layers=list(new_layers), aligned=list(aligned))
    base = set(paths) if not trainable else select(paths, trainable, **kw)
    out = base - select(paths, freeze, **kw)
    if not out:
        raise ConfigError(
            f"stage {stage!r}: trainable={list(trainable)} minus freeze={list(freeze)} leaves no parameter to train; "
            f"check the groups (layer kinds: {list(layer_kinds)})"
        )
    return sorted(out)


def _row_of(path: str, layer_kinds: Sequence[str]) -> str:
    for g in ("embeddings", "lm_head", "norms", "mlp"):
        if re.search(_COMPONENT_GROUPS[g], path):
            return g
    m = re.match(rf"{LAYERS_ATTR}/(\d+)/{MIXER_ATTR}/", path)
    if m:
        i = int(m.group(1))
        return f"mixer:{layer_kinds[i]}" if i < len(layer_kinds) else "mixers"
    return "other"


def trainable_table(sizes: Mapping[str, int], trainable: Iterable[str], *, layer_kinds: Sequence[str] = (), title: str = "") -> str:
    """A text table of parameter counts per group: total, trainable, share trainable."""
    trainable = set(trainable)
    rows: dict[str, list[int]] = {}
    for p, n in sizes.items():
        r = rows.setdefault(_row_of(p, layer_kinds), [0, 0])
        r[0] += n
        r[1] += n if p in trainable else 0
    total = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())]
    lines = [title] if title else []
    lines.append(f"{'group':<18}{'parameters':>14}{'trainable':>14}{'share':>8}")
    for name, (n, t) in sorted(rows.items()) + [("total", total)]:
        lines.append(f"{name:<18}{n:>14,}{t:>14,}{(t / n if n else 0):>8.1%}")
    return "\n".join(lines)
