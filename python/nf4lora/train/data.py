"""Training data for `nf4lora finetune`: JSONL ({"prompt","response"} or {"text"} per line), plain
text, or the default instruction set built from CPython's pydoc_data.topics (one example per
documentation section, a fixed held-out split); tokenization with the model's chat template
(loss on the response only), and a resumable, seeded batch order. Tested by tests/test_data.py."""
from __future__ import annotations

import json
import math
import os
import random
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

IGNORE_INDEX = -100  # labels with this value carry no loss (transformers' convention)
_HEADING = re.compile(r"^([^\n]+)\n([*=\-~^]{3,})$", re.M)


# ---- reading ---------------------------------------------------------------------------------

def read_jsonl(path: Union[str, os.PathLike], on_bad_line: str = "error") -> list[dict[str, str]]:
    """Examples from a JSONL file: each non-empty line an object with string "prompt" and
    "response", or a string "text". A malformed line raises ValueError naming file and line
    (on_bad_line="error") or is skipped with one warning listing the lines ("skip")."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    examples, bad = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(_parse_line(line))
            except ValueError as exc:
                if on_bad_line == "error":
                    raise ValueError(f"{path}:{lineno}: {exc} (pass --on-bad-line skip to skip such lines)") from None
                bad.append(lineno)
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
        warnings.warn(f"{path}: skipped {len(bad)} malformed lines: {shown}", stacklevel=2)
    return examples


def _parse_line(line: str) -> dict[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj or "response" in obj:
        p, r = obj.get("prompt"), obj.get("response")
        if not isinstance(p, str) or not isinstance(r, str):
            raise ValueError('"prompt" and "response" must both be strings')
        if not r:
            raise ValueError('"response" is empty')
        return {"prompt": p, "response": r}
    if isinstance(obj.get("text"), str) and obj["text"]:
        return {"text": obj["text"]}
    raise ValueError('expected keys "prompt" and "response", or a non-empty string "text"; got '
                     f"{sorted(obj)}")


def read_text(path: Union[str, os.PathLike]) -> list[dict[str, str]]:
    """A plain-text file: paragraphs (blank-line separated) as text examples."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]


def pydoc_examples(max_chars: int = 1200) -> list[dict[str, str]]:
    """One instruction example per section of CPython's pydoc topics (the text `help()` shows):
    the prompt asks for the section, the response is its text (cut at a paragraph boundary
    before max_chars). Deterministic for a given Python version."""
    from pydoc_data.topics import topics
    examples = []
    for topic in sorted(topics):
        for title, body in _sections(topics[topic]):
            body = _cut(body, max_chars)
            if len(body) < 80:
                continue
            examples.append({"prompt": f"Explain {title} (Python documentation, topic '{topic}').",
                             "response": body})
    return examples


def _sections(text: str) -> Iterator[tuple[str, str]]:
    heads = list(_HEADING.finditer(text))
    if not heads:
        yield "this", text.strip()
        return
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        yield m.group(1).strip(), text[m.end():end].strip()


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[:cut if cut > max_chars // 3 else max_chars].rstrip()


def load_examples(source: Union[str, os.PathLike, None], on_bad_line: str = "error") -> list[dict[str, str]]:
    """None: the pydoc instruction set; *.jsonl: read_jsonl; anything else: read_text."""
    if source is None or str(source) == "pydoc":
        examples = pydoc_examples()
    else:
        if not os.path.isfile(source):
            raise ValueError(f"data: {str(source)!r} is not a file")
        examples = (read_jsonl(source, on_bad_line) if str(source).endswith((".jsonl", ".json"))
                    else read_text(source))
    if not examples:
        raise ValueError(f"data: {source or 'pydoc'} holds no usable example")
    return examples


def split_examples(examples: Sequence[dict[str, str]], eval_fraction: float = 0.1,
                   max_eval: Optional[int] = None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A held-out split fixed by the content (a CRC of each example), not by order or seed, so
    every run and every resume sees the same evaluation set."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train, held = [], []
    for ex in examples:
        h = zlib.crc32(json.dumps(ex, sort_keys=True).encode()) / 2**32
        (held if h < eval_fraction else train).append(ex)
    if max_eval is not None:
        held = held[:max_eval]
    if not train:
        raise ValueError("data: no training example left after the held-out split")
    return train, held


# ---- tokenization ----------------------------------------------------------------------------

def tokenize(examples: Sequence[dict[str, str]], tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, at most max_length tokens. Prompt/response pairs go
    through the tokenizer's chat template when it has one (user turn, assistant turn) and carry
    loss on the response only; text is cut into max_length windows with loss everywhere."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        if "text" in ex:
            ids = tokenizer(ex["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            for i in range(0, len(ids), max_length):
                chunk = ids[i:i + max_length]
                if len(chunk) >= 2:
                    out.append((chunk, list(chunk)))
            continue
        prompt_ids, full_ids = _chat_ids(tokenizer, ex["prompt"], ex["response"])
        full_ids = full_ids[:max_length]
        n_prompt = min(len(prompt_ids), len(full_ids))
        if n_prompt >= len(full_ids):
            continue  # the prompt alone fills max_length: nothing to learn from
        out.append((full_ids, [IGNORE_INDEX] * n_prompt + full_ids[n_prompt:]))
    if not out:
        raise ValueError(f"data: no example left after tokenization (max_length={max_length})")
    return out


def _chat_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_ids = _ids(tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True))
        full_ids = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                      tokenize=True))
        if full_ids[:len(prompt_ids)] == prompt_ids:
            return prompt_ids, full_ids
    # No template (or one whose prompt is not a prefix of the full chat): plain concatenation.
    prompt_ids = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, prompt_ids + response_ids + eos


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "input_ids"):  # transformers 5 may return a BatchEncoding
        x = x["input_ids"]
    return list(x)


def format_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids that ask the model to answer `prompt` (generation uses the same template)."""
    if getattr(tokenizer, "chat_template", None):
        return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                  add_generation_prompt=True))
    return tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


# ---- batches ---------------------------------------------------------------------------------

def collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (padding carries no loss)."""
    n = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(items):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class BatchOrder:
    """Which examples make up each batch: a seeded permutation per epoch, walked by a cursor.
    (epoch, cursor) is the whole data position, so a checkpoint resumes exactly. With
    world_size > 1 every rank walks the same order and takes its slice of each global batch."""

    n: int
    batch_size: int
    seed: int
    epoch: int = 0
    cursor: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.n < 1:
            raise ValueError("the data set is empty")

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> list[int]:
        """The next batch's example indices (wrapping into the next epoch)."""
        out: list[int] = []
        while len(out) < self.batch_size:
            perm = self._perm(self.epoch)
            take = perm[self.cursor:self.cursor + self.batch_size - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.epoch, self.cursor = int(d["epoch"]), int(d["cursor"])
