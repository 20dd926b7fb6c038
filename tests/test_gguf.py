"""nf4lora.loading.gguf (the GGUF file parsed once): its block decoders against the gguf package's,
its metadata, tensors and transformers config against GGUFReader and transformers'
load_gguf_checkpoint, the tokenizer load_model builds against AutoTokenizer's, and bad files."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is the reference for GGUF decoding")

from nf4lora.loading.gguf import GgufFile, _DECODERS  # noqa: E402


@pytest.mark.parametrize("name", sorted(_DECODERS))
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_block_decoders_equal_gguf_package(name, rows):
    qtype = gguf.GGMLQuantizationType[name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(rows)
    data = rng.integers(0, 256, size=(rows, 3 * block_bytes), dtype=np.uint8)
    # finite float16 scales (random bytes could spell NaN payloads): a normal range of magnitudes
    scales = rng.normal(0, 0.05, size=(rows, 3, 2)).astype(np.float16).view(np.uint8).reshape(rows, 3, 4)
    view = data.reshape(rows, 3, block_bytes)
    view[:, :, :2] = scales[:, :, :2]
    if name == "Q4_1":
        view[:, :, 2:4] = scales[:, :, 2:]
    ref = gguf.dequantize(data, qtype)
    out = _DECODERS[name](data)
    assert out.shape == ref.shape == (rows, 3 * block) and out.dtype == ref.dtype
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.fixture(scope="module")
def default_gguf():
    from nf4lora.loading import default_model_path
    try:
        return default_model_path()
    except ValueError as exc:
        pytest.skip(f"the default GGUF is not installed: {exc}")


@pytest.mark.slow
def test_default_gguf_equals_gguf_reader_and_transformers(default_gguf):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    mine = GgufFile(default_gguf)
    ref = gguf.GGUFReader(str(default_gguf))
    assert [(t.name, t.tensor_type.value, tuple(int(d) for d in t.shape)) for t in ref.tensors] == \
        [(t.name, t.ggml_type, t.dims) for t in mine.tensors]
    for field in ref.fields.values():
        if field.name.startswith("GGUF."):
            continue
        value = field.contents()
        assert mine.metadata[field.name] == (value if not isinstance(value, float) else pytest.approx(value, rel=0, abs=0))
    for t, (name, weights) in zip(ref.tensors, mine.dequantized()):
        expect = gguf.dequantize(t.data, t.tensor_type)
        assert name == t.name and weights.shape == expect.shape
        assert np.array_equal(weights.view(np.uint32), expect.view(np.uint32)), name
    assert mine.has_fast_config()
    assert mine.transformers_config() == load_gguf_checkpoint(str(default_gguf), return_tensors=False)["config"]


@pytest.mark.slow
def test_default_gguf_tokenizer_equals_autotokenizer(default_gguf):
    from transformers import AutoTokenizer
    from nf4lora.loading.models import _gguf_tokenizer
    from transformers.integrations.gguf import reader
    ref = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    original, reads = reader.read_gguf_metadata, []

    def counted(*args, **kwargs):
        reads.append(args)
        return original(*args, **kwargs)
    reader.read_gguf_metadata = counted
    try:
        tok = _gguf_tokenizer(GgufFile(default_gguf))
    finally:
        reader.read_gguf_metadata = original
    assert reads == []  # the metadata GgufFile parsed, not a second parse of the file
    assert type(tok) is type(ref)
    assert tok.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    for text in ["The capital of France is", "  spaces\tand\nnewlines  ", "naïve café — 東京 🙂", "<|im_start|>x"]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
    chat = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)


def test_bad_gguf_files(tmp_path, default_gguf):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        GgufFile(empty)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match="no GGUF magic"):
        GgufFile(other)
    head = default_gguf.read_bytes()[:200_000]  # ends inside the vocabulary
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(ValueError, match="ends inside its metadata"):
        GgufFile(cut)
    whole = default_gguf.read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(whole[: len(whole) - 1000])  # the last tensor is cut
    g = GgufFile(short)
    with pytest.raises(ValueError, match="outside the file"):
        for _ in g.dequantized():
            pass
