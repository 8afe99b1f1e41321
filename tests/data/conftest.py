import pytest


@pytest.fixture(scope="session")
def micro_tokenizer_dir(tmp_path_factory):
    from hybrid_jax.data.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("micro_tokenizer")
    build_tokenizer(str(out))
    return str(out)


@pytest.fixture(scope="session")
def micro_tokenizer(micro_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_tokenizer_dir)
