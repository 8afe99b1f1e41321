"""scripts/bench_kda_mosaic.py: the Mosaic GPU port of KDA's output kernel still lowers for CUDA
(on the CPU: tiles, TMA layouts and the shared-memory budget are checked at lowering), and a
config whose stages overflow shared memory is refused there."""


import pytest

from tests.fixtures import load_script

bench = load_script("bench_kda_mosaic")

SHAPE = (1, 4096, 2, 128, 128)  # B, T, H, K, V: T a multiple of 64 chunks per CTA x 64 tokens


def test_benchmarked_configs_lower_for_cuda(capsys):
    configs = [(64, 2, 16, "wg"), (64, 2, 64, "lane"), (128, 1, 64, "wg")]
    bench.lower_only(SHAPE, configs)
    assert capsys.readouterr().out.count("lowered for cuda") == len(configs)


def test_stages_beyond_shared_memory_are_refused():
    # bv=128 with two stages needs ~246 KB of shared memory, over the 227 KB of a Hopper SM
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        bench.lower_only(SHAPE, [(128, 2, 16, "wg")])
