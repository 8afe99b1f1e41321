"""Configuration of hybrid Qwen3 students exported by hybrid_jax (model_type "hybrid_qwen3").

A Qwen3 configuration plus, per layer, the sequence mixer that replaces (or keeps) softmax attention:

    layer_spec     "attention:0,2;kda:1,3"   every layer named once, 0-indexed
    mixer_types    ["attention", "kda", "attention", "kda"]   the same, one name per layer
    mixer_configs  [{...}, {...}, ...]       hyperparameters of each layer's mixer

Mixers: attention (Qwen3), kda (Kimi Delta Attention), gdn (KDA with one decay per head), swa
(the Qwen3 attention over a sliding window plus sink tokens) and allmem (swa + alpha * TTT memory).
Loaded with `AutoConfig.from_pretrained(dir, trust_remote_code=True)`; written by hybrid_jax's export.
"""

from transformers import Qwen3Config

MIXER_TYPES = ("attention", "kda", "gdn", "swa", "allmem")


def parse_layer_spec(spec, num_layers):
    """"attention:0,2;kda:1,3" -> per-layer names; ranges a-b allowed; every layer exactly once."""
    owner = {}
    for group in [g.strip() for g in spec.split(";") if g.strip()]:
        mixer, sep, idx = group.partition(":")
        mixer = mixer.strip()
        if not sep or mixer not in MIXER_TYPES:
            raise ValueError(f"HybridQwen3Config: layer_spec group {group!r} names unknown mixer {mixer!r}; "
                             f"known mixers: {', '.join(MIXER_TYPES)}")
        for tok in [t.strip() for t in idx.split(",") if t.strip()]:
            lo, _, hi = tok.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                if i in owner:
                    raise ValueError(f"HybridQwen3Config: layer {i} is named twice in layer_spec {spec!r}")
                owner[i] = mixer
    if sorted(owner) != list(range(num_layers)):
        raise ValueError(f"HybridQwen3Config: layer_spec {spec!r} must name every layer 0..{num_layers - 1} once")
    return [owner[i] for i in range(num_layers)]


class HybridQwen3Config(Qwen3Config):
    model_type = "hybrid_qwen3"

    def __init__(self, layer_spec=None, mixer_types=None, mixer_configs=None, **kwargs):
        self.layer_spec = layer_spec
        self.mixer_types = mixer_types
        self.mixer_configs = mixer_configs
        super().__init__(**kwargs)
        n = self.num_hidden_layers
        if self.mixer_types is None:
            self.mixer_types = parse_layer_spec(layer_spec, n) if layer_spec else ["attention"] * n
        elif layer_spec and parse_layer_spec(layer_spec, n) != list(self.mixer_types):
            raise ValueError(f"HybridQwen3Config: mixer_types {self.mixer_types} disagree with layer_spec {layer_spec!r}")
        unknown = sorted({t for t in self.mixer_types if t not in MIXER_TYPES})
        if unknown:
            raise ValueError(f"HybridQwen3Config: unknown mixer type(s) {unknown}; known: {', '.join(MIXER_TYPES)}")
        if len(self.mixer_types) != n:
            raise ValueError(f"HybridQwen3Config: {len(self.mixer_types)} mixer_types for num_hidden_layers={n}")
        if self.mixer_configs is None:
            self.mixer_configs = [{} for _ in range(n)]
        if len(self.mixer_configs) != n:
            raise ValueError(f"HybridQwen3Config: {len(self.mixer_configs)} mixer_configs for num_hidden_layers={n}")
