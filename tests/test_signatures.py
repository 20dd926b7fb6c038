"""The public API keeps its real signatures: every public callable of nf4lora and nf4lora.optim
shows named parameters to inspect.signature (no bare *args/**kwargs from a wrapper) and has its
own name and module, and the optimizer variants (PagedAdamW, AdamW8bit, ...: thin
subclasses that pass arguments on) report the defaults they really use."""
import inspect

import pytest
import torch

import nf4lora as nl
from nf4lora import optim

VARIANTS = ["PagedAdamW", "AdamW8bit", "PagedAdamW8bit", "PagedLion", "Lion8bit", "PagedLion8bit"]
PUBLIC = sorted({n for n in nl.__all__ if callable(getattr(nl, n))}
                | {f"optim.{n}" for n in ["AdamW", "Lion"] + VARIANTS})


def _get(name):
    obj = nl
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", PUBLIC)
def test_public_callables_show_their_parameters(name):
    obj = _get(name)
    sig = inspect.signature(obj)
    variadic = [p.name for p in sig.parameters.values()
                if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    assert not variadic, f"{name}{sig}: *args/**kwargs hide the real parameters"
    assert obj.__name__ == name.split(".")[-1]
    assert obj.__module__.startswith("nf4lora")


@pytest.mark.parametrize("name", VARIANTS)
def test_optimizer_variants_report_the_defaults_they_use(name, tmp_path):
    cls = getattr(optim, name)
    sig = inspect.signature(cls)
    d = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    p = torch.nn.Parameter(torch.zeros(8))
    kw = {"page_dir": str(tmp_path)} if d["paged"] else {}
    opt = cls([p], **kw)
    assert (opt.paged, opt.optim_bits, opt.min_8bit_size) == (d["paged"], d["optim_bits"], d["min_8bit_size"])
    for key in ("lr", "betas", "eps", "weight_decay"):
        if key in d:
            assert opt.defaults[key] == d[key], key
    # the signature binds what the class accepts, positionally too
    bound = sig.bind([p], 0.5)
    assert cls(*bound.args, **bound.kwargs, **kw).defaults["lr"] == 0.5
    with pytest.raises(TypeError):
        sig.bind([p], no_such_argument=1)
