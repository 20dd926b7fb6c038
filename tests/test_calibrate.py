"""The CPU dispatch calibration (nf4lora/ops/calibrate.py): one real measurement gives valid
choices and is cached; the cache is reused, and a corrupt, foreign or stale one is ignored with a
warning; NF4LORA_CALIBRATE=0 measures nothing; NF4LORA_DISPATCH and DISPATCH fields force choices;
and every forced route gives the float64 reference's numbers under the 2x error rule."""
import json
import subprocess
import sys

import pytest
import torch

import nf4lora as nl
from nf4lora.ops import DISPATCH, calibrate
from nf4lora.ops.attention import ROUTES
from nf4lora.ops.dispatch import parse_forced


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NF4LORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(DISPATCH, "calibration", None)
    return tmp_path


def fake_measure(choices=None):
    def measure():
        c = dict(calibrate.DEFAULTS, **(choices or {}))
        return calibrate.Calibration(c, {"fake": 1.0}, calibrate.machine_key(), "measured", None, 0.01)
    return measure


def test_a_real_measurement_is_valid_cached_and_reused(cache, monkeypatch):
    # measured where a first use may come from: an evaluation under no_grad, in bf16 autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cal = calibrate.calibrate()
    assert cal.source == "measured" and 0 < cal.seconds < 60
    assert set(cal.choices) == set(calibrate.DEFAULTS)
    assert isinstance(cal.choices["cpu_gemm_fp32"], bool)
    assert cal.choices["cpu_fused_max_rows"] in (0, 1, 2, 4, 8) and cal.choices["cpu_fused_t_max_rows"] in (0, 1, 2, 4, 8)
    gemm = cal.measurements["gemm_M256_1024x1024_ms"]
    assert cal.choices["cpu_gemm_fp32"] == (gemm["fp32"] < 0.95 * gemm["bf16"])  # the rule, from its own numbers
    for direction, field in (("forward", "cpu_fused_max_rows"), ("transposed", "cpu_fused_t_max_rows")):
        times = cal.measurements[f"{direction}_2048x2048_ms"]
        wins = [t["fused"] <= t["scratch"] for t in times.values()]
        expected = 0
        for m, win in zip(calibrate.ROWS, wins):
            if not win:
                break
            expected = m
        assert cal.choices[field] == expected
    variants = cal.measurements.get("variant_M1_2048x2048_fwd_plus_t_ms")
    if variants:  # more than one SIMD variant here: the default unless another is 5% faster
        fastest = min(variants, key=variants.get)
        default = calibrate.DEFAULTS["cpu_matmul_variant"]
        assert cal.choices["cpu_matmul_variant"] == (fastest if variants[fastest] < 0.95 * variants[default] else default)
    grains = cal.measurements.get("grain_M1_ms_after_torch_mm")
    if torch.get_num_threads() > 1:
        rel = {g: sum(t[str(g)] / t[str(calibrate.DEFAULTS["cpu_grain_kib"])] for t in grains.values())
               for g in calibrate.GRAINS_KIB}
        best = min(rel, key=rel.get)
        assert cal.choices["cpu_grain_kib"] == (best if rel[best] < 0.95 * len(grains) else calibrate.DEFAULTS["cpu_grain_kib"])
    assert nl.ops.native.matmul_choices() == (cal.choices["cpu_matmul_variant"], cal.choices["cpu_grain_kib"] * 1024)
    att = cal.measurements["attention_fwd_bwd_2x9x128x64_ms"]
    assert set(att) == set(ROUTES) and cal.choices["cpu_attention"] in ROUTES
    fastest = min(att, key=att.get)
    assert cal.choices["cpu_attention"] == (fastest if att[fastest] < 0.95 * att["sdpa"] else "sdpa")
    files = list(cache.glob("calibration-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["choices"] == cal.choices
    monkeypatch.setattr(calibrate, "measure", lambda: pytest.fail("measured again despite the cache"))
    again = calibrate.calibrate()
    assert again.source == "cache" and again.choices == cal.choices and DISPATCH.calibration is again


def test_dispatch_measures_on_first_use_and_forced_fields_win(cache, monkeypatch):
    monkeypatch.setenv("NF4LORA_CALIBRATE", "1")
    monkeypatch.setattr(calibrate, "measure", fake_measure({"cpu_fused_max_rows": 2, "cpu_gemm_fp32": True}))
    assert DISPATCH.cpu_rows() == 2 and DISPATCH.cpu_gemm_in_fp32(torch.bfloat16)
    assert not DISPATCH.cpu_gemm_in_fp32(torch.float16)
    assert DISPATCH.calibration.source == "measured"
    with DISPATCH.override(cpu_fused_max_rows=5, cpu_gemm_fp32=False):
        assert DISPATCH.cpu_rows() == 5 and not DISPATCH.cpu_gemm_in_fp32(torch.bfloat16)
    assert DISPATCH.cpu_rows() == 2
    with pytest.raises(ValueError, match="unknown dispatch choices"):
        with DISPATCH.override(gemv_rows=3):
            pass


def test_the_native_choices_follow_dispatch(cache, monkeypatch):
    """The products' variant and grain live in the core: DISPATCH installs the calibrated ones,
    a forced field wins and is undone on leaving override(), and nf4lora.set_cpu_variant wins over
    all of it. Another DispatchPolicy object changes nothing native."""
    from nf4lora.ops import native
    from nf4lora.ops.dispatch import DispatchPolicy
    simd = [v for v in nl.cpu_variants() if v != "ref"]
    pick = simd[0] if simd else "ref"
    monkeypatch.setenv("NF4LORA_CALIBRATE", "1")
    monkeypatch.setattr(calibrate, "measure", fake_measure({"cpu_matmul_variant": pick, "cpu_grain_kib": 16}))
    try:
        assert DISPATCH.cpu_matmul_choices() == (pick, 16)
        assert native.matmul_choices() == (pick, 16 * 1024)
        with DISPATCH.override(cpu_matmul_variant="ref", cpu_grain_kib=1024):
            assert native.matmul_choices() == ("ref", 1024 * 1024)
            DispatchPolicy(cpu_grain_kib=64)
            assert native.matmul_choices() == ("ref", 1024 * 1024)
        assert native.matmul_choices() == (pick, 16 * 1024)
        with nl.use_cpu_variant("ref"):
            assert native.matmul_choices()[0] == "ref"
        assert native.matmul_choices()[0] == pick
        with pytest.raises(ValueError, match="not one this machine runs"):
            with DISPATCH.override(cpu_matmul_variant="sparc"):
                pass
    finally:
        monkeypatch.setattr(DISPATCH, "calibration", None)
    assert native.matmul_choices() == (calibrate.DEFAULTS["cpu_matmul_variant"], 256 * 1024)


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "stale", "out of range", "unknown variant", "unknown route"])
def test_a_bad_cache_is_ignored_with_a_warning(cache, monkeypatch, damage):
    monkeypatch.setattr(calibrate, "measure", fake_measure())
    key = calibrate.machine_key()
    path = calibrate.cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    good = {"version": calibrate.VERSION, "key": key, "choices": dict(calibrate.DEFAULTS, cpu_fused_max_rows=1),
            "measurements": {}}
    if damage == "corrupt":
        path.write_text('{"version": 1, "key": ')
    elif damage == "foreign":
        path.write_text(json.dumps(dict(good, key=dict(key, cpu="another CPU"))))
    elif damage == "stale":
        path.write_text(json.dumps(dict(good, version=calibrate.VERSION - 1)))
    elif damage == "unknown variant":
        path.write_text(json.dumps(dict(good, choices=dict(good["choices"], cpu_matmul_variant="sparc"))))
    elif damage == "out of range":
        path.write_text(json.dumps(dict(good, choices=dict(good["choices"], cpu_fused_max_rows=99))))
    else:
        path.write_text(json.dumps(dict(good, choices=dict(good["choices"], cpu_attention="flash"))))
    with pytest.warns(RuntimeWarning, match={"corrupt": "corrupt", "foreign": "another machine", "stale": "stale",
                                             "out of range": "corrupt", "unknown variant": "corrupt",
                                             "unknown route": "corrupt"}[damage]):
        cal = calibrate.calibrate()
    assert cal.source == "measured" and cal.choices == calibrate.DEFAULTS
    assert json.loads(path.read_text())["choices"] == calibrate.DEFAULTS  # replaced by the new measurement
    path.write_text(json.dumps(good))  # and an intact one is trusted
    assert calibrate.calibrate().choices["cpu_fused_max_rows"] == 1


def test_calibration_off_measures_nothing(cache, monkeypatch):
    monkeypatch.setenv("NF4LORA_CALIBRATE", "0")
    monkeypatch.setattr(calibrate, "measure", lambda: pytest.fail("measured with NF4LORA_CALIBRATE=0"))
    assert DISPATCH.cpu_rows() == calibrate.DEFAULTS["cpu_fused_max_rows"]
    assert DISPATCH.calibration.source.startswith("default")
    assert not list(cache.iterdir())
    monkeypatch.setenv("NF4LORA_CALIBRATE", "sometimes")
    monkeypatch.setattr(DISPATCH, "calibration", None)
    with pytest.raises(ValueError, match="NF4LORA_CALIBRATE"):
        DISPATCH.cpu_rows()


def test_forcing_through_the_environment():
    assert parse_forced("cpu_gemm_fp32=1, cpu_fused_max_rows=4") == {"cpu_gemm_fp32": True, "cpu_fused_max_rows": 4}
    assert parse_forced("") == {}
    assert parse_forced("cpu_matmul_variant=AVX512, cpu_grain_kib=64") == {"cpu_matmul_variant": "avx512",
                                                                            "cpu_grain_kib": 64}
    assert parse_forced("cpu_attention=gqa") == {"cpu_attention": "gqa"}
    with pytest.raises(ValueError, match="cpu_attention must be one of"):
        with DISPATCH.override(cpu_attention="flash"):
            pass
    for bad, msg in (("cpu_gemm_fp32=maybe", "1/0/true/false"), ("cpu_fused_max_rows=-1", "non-negative"),
                     ("cpu_attention=flash", "cpu_attention must be one of"),
                     ("cpu_grain_kib=0", "1.."), ("cpu_grain_kib=9999999", "1.."),
                     ("gemv=3", "unknown dispatch choices"), ("cpu_fused_max_rows", "name=value")):
        with pytest.raises(ValueError, match=msg):
            parse_forced(bad)
    code = ("import nf4lora.ops as o, torch; print(o.DISPATCH.cpu_rows(), o.DISPATCH.cpu_gemm_in_fp32(torch.bfloat16), "
            "o.DISPATCH.cpu_attention_route(torch.bfloat16), o.DISPATCH.cpu_attention_route(torch.float32))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ,
                              "NF4LORA_DISPATCH": "cpu_fused_max_rows=3,cpu_gemm_fp32=true,cpu_attention=fp32",
                              "NF4LORA_CALIBRATE": "0"})
    assert out.stdout.split() == ["3", "True", "fp32", "sdpa"]
    code = "import nf4lora.ops.native as n; print(*n.matmul_choices())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "NF4LORA_DISPATCH": "cpu_matmul_variant=ref,cpu_grain_kib=32",
                              "NF4LORA_CALIBRATE": "0"})
    assert out.stdout.split() == ["ref", str(32 * 1024)]
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "NF4LORA_DISPATCH": "cpu_matmul_variant=sparc"})
    assert bad.returncode != 0 and "not one this machine runs" in bad.stderr


@pytest.mark.parametrize("fp32, rows, variant, grain", [(False, 0, None, None), (False, 8, None, None),
                                                      (True, 0, None, None), (True, 8, None, None)]
                         + [(False, 8, v, g) for v in nl.cpu_variants() for g in (1, 1024)])
def test_every_forced_route_matches_the_reference(fp32, rows, variant, grain):
    """Each choice calibration can make, forced, against float64 under the 2x error rule."""
    torch.manual_seed(0)
    w = torch.randn(96, 320) * 0.05
    packed, state = nl.quantize_4bit(w, 64, "nf4")
    w64 = nl.dequantize_4bit(packed, state, dtype=torch.float32).double()
    w_bf16 = nl.dequantize_4bit(packed, state, dtype=torch.bfloat16)
    with DISPATCH.override(cpu_gemm_fp32=fp32, cpu_fused_max_rows=rows, cpu_fused_t_max_rows=rows,
                           cpu_matmul_variant=variant, cpu_grain_kib=grain):
        for M in (1, 5, 8, 40):
            x = torch.randn(M, 320).bfloat16().requires_grad_()
            y = nl.matmul_4bit(x, packed, state)
            gy = torch.randn(M, 96).bfloat16()
            y.backward(gy)
            ref_y, ref_gx = x.detach().double() @ w64.T, gy.double() @ w64
            dense_y = torch.nn.functional.linear(x.detach(), w_bf16).double()
            dense_gx = (gy @ w_bf16).double()
            assert (y.double() - ref_y).abs().max() <= 2 * (dense_y - ref_y).abs().max() + 1e-6
            assert (x.grad.double() - ref_gx).abs().max() <= 2 * (dense_gx - ref_gx).abs().max() + 1e-6


def test_the_tune_command_shows_the_choices(cache, capsys, monkeypatch):
    from nf4lora.cli import main
    monkeypatch.setattr(calibrate, "measure", fake_measure({"cpu_fused_t_max_rows": 4, "cpu_attention": "gqa"}))
    assert main(["tune"]) == 0
    out = capsys.readouterr().out
    assert "calibration: measured" in out and "fused transposed kernel up to M = 4" in out
    assert f"kernel variant: {calibrate.DEFAULTS['cpu_matmul_variant']}" in out and "at least 256 KiB" in out
    assert "bf16 attention route: gqa" in out
    assert main(["tune", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "cache" and data["choices"]["cpu_fused_t_max_rows"] == 4
