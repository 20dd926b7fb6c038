"""The training step and the decode step under torch.compile(fullgraph=True): a tiny Llama (1 layer)
with 4-bit base layers (nn Linear4bit) and LoRA adapters, traced without a single graph break and
computing what eager mode computes. The training step is the trainer's loss module
(train/loop.py: CausalLMLoss) under the trainer's bf16 autocast, forward compiled, backward through
AOTAutograd's compiled backward graph; the decode step is one token of generation with a static
KV cache. On a CUDA GPU the same steps run under CUDA graphs (mode="reduce-overhead").
What broke before: the dispatch policy loading its calibration (/proc/cpuinfo, files) inside the
first traced product (ops/dispatch.py: _calibrated) and the loss's boolean-mask indexing (a
data-dependent shape; CausalLMLoss takes the dense head under torch.compile)."""
import pytest
import torch

import nf4lora as nl
from nf4lora.train import CausalLMLoss

from .tiny_lm import tiny_config

CUDA = torch.cuda.is_available() and nl.has_cuda()


def needs_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (and nf4lora built with CUDA)")(test))


# inductor compiles C++ on the CPU: ~30-55 s a test on the 2-core development VM (aot_eager: ~4-16 s)
INDUCTOR = pytest.param("inductor", marks=pytest.mark.slow)


@pytest.fixture(autouse=True)
def fresh_calibration(monkeypatch):
    """Each test traces the first product that asks DISPATCH for a choice (the load it triggers
    must not break the graph), not one whose calibration an earlier test loaded."""
    from nf4lora.ops import DISPATCH
    monkeypatch.setattr(DISPATCH, "calibration", None)


def tiny_qlora(device="cpu", seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=1))
    model = nl.get_lora_model(nl.quantize_model(model.to(device)), nl.LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():  # B = 0 would make every adapter gradient but B's zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 259, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels[1, 20:] = -100
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def graph_breaks(fn, *args, **kwargs) -> list[str]:
    torch._dynamo.reset()
    explain = torch._dynamo.explain(fn)(*args, **kwargs)
    return [str(b.reason).splitlines()[0] + " at " + "; ".join(f"{f.filename}:{f.lineno}" for f in b.user_stack[-3:])
            for b in explain.break_reasons]


def train_step(model, step_fn, data, bf16):
    """(loss, token count, adapter gradients) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(data["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, n = step_fn(**data)
    (loss / n).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), int(n), grads


def check_train_step(device, bf16, **compile_kw):
    model = tiny_qlora(device)
    data = batch(device)
    loss_module = CausalLMLoss(model)

    def step(**kw):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return loss_module(**kw)

    assert graph_breaks(step, **data) == []
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, **compile_kw)
    ref_loss, ref_n, ref_grads = train_step(model, step, data, bf16)
    for _ in range(2):  # the second call replays what the first recorded (CUDA graphs)
        loss, n, grads = train_step(model, compiled, data, bf16)
        assert n == ref_n == int((data["labels"][:, 1:] != -100).sum())
        tol = 2e-2 if bf16 else 1e-4
        assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss)), (float(loss), float(ref_loss))
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7  # A and B of the 7 linears
        for k, g in grads.items():
            scale = ref_grads[k].abs().max()
            assert scale > 0, k
            assert (g - ref_grads[k]).abs().max() <= (5e-2 if bf16 else 1e-3) * scale, k


@pytest.mark.parametrize("backend,bf16", [("aot_eager", False), ("aot_eager", True),
                                          pytest.param("inductor", False, marks=pytest.mark.slow)])
def test_training_step_compiles_fullgraph(backend, bf16):
    check_train_step("cpu", bf16, backend=backend)


def decode_logits(model, step_fn, prompt, steps, device):
    """Logits of `steps` greedy tokens after `prompt`, each from step_fn(token, position, cache)."""
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 1)
    out = []
    with torch.inference_mode():
        logits = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1]
        for i in range(steps):
            token = logits.argmax(-1, keepdim=True)
            pos = torch.tensor([prompt.shape[1] + i], device=device)
            logits = step_fn(token, pos, cache)[:, -1]
            out.append(logits.float().clone())
    return torch.stack(out)


def check_decode_step(device, **compile_kw):
    model = tiny_qlora(device).eval()

    def decode(token, pos, cache):
        return model(input_ids=token, position_ids=pos[None], cache_position=pos, cache=cache,
                     use_cache=True, logits_to_keep=1).logits

    prompt = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(2)).to(device)
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.inference_mode():
        model(input_ids=prompt, cache=cache, use_cache=True)
        assert graph_breaks(decode, prompt[:, :1], torch.tensor([9], device=device), cache) == []
    torch._dynamo.reset()
    ref = decode_logits(model, decode, prompt, 5, device)
    got = decode_logits(model, torch.compile(decode, fullgraph=True, **compile_kw), prompt, 5, device)
    # Linear4bit computes in bf16 by default; inductor keeps the fused LoRA sum in fp32 where eager
    # rounds it to bf16 once (torch._inductor.config.emulate_precision_casts is off): half a bf16 ulp
    assert torch.allclose(got, ref, atol=8e-3 * ref.abs().max()), (got - ref).abs().max()


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_decode_step_compiles_fullgraph(backend):
    check_decode_step("cpu", backend=backend)


def test_eager_cpu_route_is_not_taken_while_compiling():
    """The eager CPU route calls the kernels without the dispatcher; traced, it would bake a
    Python call into the graph. Under torch.compile the product must be the nf4lora op."""
    from nf4lora.ops.matmul import is_plain_eager_cpu
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        seen.append(is_plain_eager_cpu(x))
        return x + 1

    torch._dynamo.reset()
    f(torch.ones(2))
    assert seen == [False] and is_plain_eager_cpu(torch.ones(2))


@needs_cuda
def test_training_step_cuda_graphs():
    check_train_step("cuda", True, mode="reduce-overhead")


@needs_cuda
def test_decode_step_cuda_graphs():
    check_decode_step("cuda", mode="reduce-overhead")


@needs_cuda
def test_training_step_compiles_fullgraph_cuda():
    check_train_step("cuda", True)
