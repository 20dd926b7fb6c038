"""Shared fixtures and options: every CPU kernel variant this machine supports, so each test
that takes `cpu_variant` runs once per variant (forced through nf4lora.use_cpu_variant);
`--runslow` opts in to tests marked slow; `--fuzz-examples N` (or NF4LORA_FUZZ_EXAMPLES) sets how
many examples each fuzz test in test_fuzz.py draws (CI runs the small default). Tests run with the
CPU dispatch calibration off (fixed, machine-independent routes; tests/test_calibrate.py tests it)."""
import os

os.environ.setdefault("NF4LORA_CALIBRATE", "0")

import pytest

import nf4lora


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--fuzz-examples", type=int, default=int(os.environ.get("NF4LORA_FUZZ_EXAMPLES", "40")),
                     help="hypothesis examples per fuzz test (default 40, or $NF4LORA_FUZZ_EXAMPLES)")


def pytest_configure(config):
    os.environ["NF4LORA_FUZZ_EXAMPLES"] = str(config.getoption("--fuzz-examples"))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def pytest_generate_tests(metafunc):
    if "cpu_variant" in metafunc.fixturenames:
        metafunc.parametrize("cpu_variant", nf4lora.cpu_variants(supported_only=True))


@pytest.fixture(autouse=True)
def _restore_cpu_variant():
    yield
    nf4lora.set_cpu_variant(None)
