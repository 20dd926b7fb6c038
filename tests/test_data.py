"""nf4lora.train.data: JSONL/plain-text/pydoc reading (line-numbered errors, skip mode), the fixed
held-out split, chat-template tokenization (loss on the response tokens only, checked against the
template's own rendering) and the resumable batch order (resumed == uninterrupted)."""
import json

import pytest

from nf4lora.train import data as D

from .tiny_lm import make_tokenizer


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_pairs_and_text(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "a", "response": "b"}), "", json.dumps({"text": "t"})])
    assert D.load_examples(p) == [{"prompt": "a", "response": "b"}, {"text": "t"}]


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", json.dumps({"prompt": "a"}),
                                 json.dumps({"prompt": 1, "response": "b"}), json.dumps({"other": "x"}),
                                 json.dumps({"prompt": "a", "response": ""})])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad):
    p = _write(tmp_path, [json.dumps({"text": "ok"}), json.dumps({"text": "ok2"}), bad])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: "):
        D.load_examples(p)
    with pytest.warns(UserWarning, match=r"skipped 1 malformed lines: 3"):
        assert D.load_examples(p, on_bad_line="skip") == [{"text": "ok"}, {"text": "ok2"}]


def test_empty_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="no usable example"):
        D.load_examples(_write(tmp_path, [""]))
    with pytest.raises(ValueError, match="not a file"):
        D.load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_bad_line"):
        D.read_jsonl(_write(tmp_path, ["{}"]), on_bad_line="ignore")


def test_plain_text_paragraphs(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first para\nline two\n\n\nsecond\n")
    assert D.load_examples(p) == [{"text": "first para\nline two"}, {"text": "second"}]


def test_pydoc_set_and_split_are_fixed():
    ex = D.load_examples(None)
    assert len(ex) > 100 and all(e["response"] for e in ex)
    train, held = D.split_examples(ex, 0.1)
    train2, held2 = D.split_examples(list(reversed(ex)), 0.1)
    assert {json.dumps(e) for e in held} == {json.dumps(e) for e in held2}  # by content, not order
    assert not ({json.dumps(e) for e in held} & {json.dumps(e) for e in train})
    assert 0.03 < len(held) / len(ex) < 0.2


def test_chat_tokenization_masks_the_prompt():
    tok = make_tokenizer()
    items = D.tokenize([{"prompt": "Q?", "response": "Answer."}], tok, 200)
    ids, labels = items[0]
    full = tok.apply_chat_template([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer."}],
                                   tokenize=False)
    assert tok.decode(ids) == full
    learned = [t for t in labels if t != D.IGNORE_INDEX]
    assert tok.decode(learned) == "Answer.<|im_end|>\n"
    assert labels[:len(ids) - len(learned)] == [D.IGNORE_INDEX] * (len(ids) - len(learned))


def test_text_windows_and_truncation():
    tok = make_tokenizer()
    items = D.tokenize([{"text": "x" * 25}], tok, 10)
    assert [len(i) for i, _ in items] == [10, 10, 6]  # 25 bytes + eos
    assert all(i == lab for i, lab in items)
    long = D.tokenize([{"prompt": "p", "response": "r" * 500}], tok, 64)
    assert len(long[0][0]) == 64
    with pytest.raises(ValueError, match="no example left"):
        D.tokenize([{"prompt": "p" * 100, "response": "r"}], tok, 16)


def test_batch_order_resumes_exactly():
    a = D.BatchOrder(10, 3, seed=7)
    seq = [a.next() for _ in range(9)]
    flat = sum(seq, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    b = D.BatchOrder(10, 3, seed=7)
    for _ in range(4):
        b.next()
    c = D.BatchOrder(10, 3, seed=7)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(5)] == seq[4:]
    assert [D.BatchOrder(10, 3, seed=8).next() for _ in range(3)] != seq[:3]


def test_collate_pads_without_loss():
    batch = D.collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
