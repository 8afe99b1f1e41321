"""The micro-world as a TFDS data set (array_record), read like any other data set.

    tfds.data_source("microworld/instruct", split="train", data_dir=DIR)

Configs: ``corpus``, ``instruct`` (split ``train``), ``open``, ``mc``, ``mqar``,
``passkey`` (split ``test``) on the default world, and the same tasks with ``_large`` on a
larger world (for the GPU teacher). Long-context lengths are counted in words (see
`microworld.associative_recall`). Examples keep the generator's order
(`disable_shuffling`), so `tfds.data_source(...)[i]` is the generator's record i.

Build from the command line: ``python -m hybrid_jax.data.tfds_builders --data_dir=DIR``;
`sources.TfdsSource` builds a missing micro-world config on first use (with a log line).
Importing this module needs tensorflow-datasets (TensorFlow itself is not needed).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from hybrid_jax.data import microworld

try:
    import tensorflow_datasets as tfds
    from etils import epath
except ImportError as e:
    raise ImportError("hybrid_jax.data.tfds_builders needs the 'tensorflow-datasets' package "
                      "(pip install tensorflow-datasets); without it, read the micro-world "
                      "with data source kind='microworld'") from e

log = logging.getLogger(__name__)

TASKS = ("corpus", "instruct", "open", "mc", "mqar", "passkey")
LONG_EXAMPLES_PER_LENGTH = 8

_T = tfds.features.Text
_FEATURES = {
    "corpus": {"text": _T()},
    "instruct": {"messages": tfds.features.Sequence({"role": _T(), "content": _T()})},
    "open": {"question": _T(), "answer": _T(), "entity": _T(), "attribute": _T()},
    "mc": {"question": _T(), "choices": tfds.features.Sequence(_T()),
           "answer_index": np.int32, "entity": _T(), "attribute": _T()},
    "mqar": {"context": _T(), "queries": tfds.features.Sequence(_T()),
             "answers": tfds.features.Sequence(_T()), "context_length": np.int32},
    "passkey": {"context": _T(), "question": _T(), "answer": _T(), "depth_percent": np.int32,
                "context_length": np.int32},
}


@dataclasses.dataclass
class MicroWorldConfig(tfds.core.BuilderConfig):
    task: str = "corpus"
    world: microworld.WorldConfig = dataclasses.field(default_factory=microworld.WorldConfig)


def task_split(task: str) -> str:
    return "train" if task in ("corpus", "instruct") else "test"


def task_records(task: str, world: microworld.WorldConfig) -> list[dict]:
    """The records a config holds, straight from the generator (the test oracle)."""
    if task == "mqar":
        return [e for n in microworld.MQAR_LENGTHS
                for e in microworld.associative_recall(n, LONG_EXAMPLES_PER_LENGTH,
                                                       seed=world.seed)]
    if task == "passkey":
        return [e for n in microworld.PASSKEY_LENGTHS
                for e in microworld.passkey(n, LONG_EXAMPLES_PER_LENGTH, seed=world.seed)]
    return microworld.World(world).task(task)


class Microworld(tfds.core.GeneratorBasedBuilder):
    """Synthetic micro-world: pretraining corpus, chat QA and evaluation sets."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [MicroWorldConfig(name=t, task=t) for t in TASKS] + [
        MicroWorldConfig(name=f"{t}_large", task=t, world=microworld.LARGE_WORLD) for t in TASKS]

    # TFDS looks for a checksums file next to the builder's code and, for modules inside a
    # package, probes `importlib_resources` (not installed here); name the file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(_FEATURES[self.builder_config.task]),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {task_split(self.builder_config.task): self._generate_examples()}

    def _generate_examples(self):
        yield from enumerate(task_records(self.builder_config.task, self.builder_config.world))


def prepare(name: str, data_dir: str | None = None):
    """Build `microworld/<config>` into data_dir unless it is already there."""
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        log.info("building TFDS %s into %s (first use)", name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
    return builder


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Build the micro-world TFDS configs.")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--configs", default=",".join(TASKS),
                   help=f"comma-separated config names (tasks {TASKS}, optionally '_large')")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for c in a.configs.split(","):
        prepare(f"microworld/{c}", a.data_dir)


if __name__ == "__main__":
    main()
