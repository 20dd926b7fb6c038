"""Shared fixtures and options: every CPU kernel variant this machine supports, so each test
that takes `cpu_variant` runs once per variant (forced through nf4lora.use_cpu_variant);
`--runslow` opts in to tests marked slow; `--fuzz-examples N` (or NF4LORA_FUZZ_EXAMPLES) sets how
many examples each fuzz test in test_fuzz.py draws (CI runs the small default);
`--fail-on-unexpected-skip` (or NF4LORA_FAIL_ON_SKIP=1, which CI sets) turns every skip whose reason
is not "no CUDA GPU" into a failure, at collection too (a peer import that fails then fails). Tests
run with the CPU dispatch calibration off (fixed, machine-independent routes; tests/test_calibrate.py
tests it)."""
import os
import re

os.environ.setdefault("NF4LORA_CALIBRATE", "0")

import pytest

import nf4lora


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--fuzz-examples", type=int, default=int(os.environ.get("NF4LORA_FUZZ_EXAMPLES", "40")),
                     help="hypothesis examples per fuzz test (default 40, or $NF4LORA_FUZZ_EXAMPLES)")
    parser.addoption("--fail-on-unexpected-skip", action="store_true",
                     default=os.environ.get("NF4LORA_FAIL_ON_SKIP", "") not in ("", "0"),
                     help="fail every skip whose reason is not 'no CUDA GPU' (default: $NF4LORA_FAIL_ON_SKIP)")


def pytest_configure(config):
    os.environ["NF4LORA_FUZZ_EXAMPLES"] = str(config.getoption("--fuzz-examples"))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# The one skip CI accepts: a CUDA test on a machine without a GPU (their reasons say "needs a CUDA GPU").
ALLOWED_SKIP = re.compile(r"needs a CUDA GPU|no CUDA GPU")


def _fail_unexpected_skip(config, rep) -> None:
    if not rep.skipped or hasattr(rep, "wasxfail") or not config.getoption("--fail-on-unexpected-skip"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if ALLOWED_SKIP.search(reason):
        return
    rep.outcome = "failed"
    rep.longrepr = (f"unexpected skip ({reason}); with --fail-on-unexpected-skip / NF4LORA_FAIL_ON_SKIP=1 "
                    "only 'no CUDA GPU' may skip")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(item.config, outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unexpected_skip(collector.config, outcome.get_result())


def pytest_generate_tests(metafunc):
    if "cpu_variant" in metafunc.fixturenames:
        metafunc.parametrize("cpu_variant", nf4lora.cpu_variants(supported_only=True))


@pytest.fixture(autouse=True)
def _restore_cpu_variant():
    yield
    nf4lora.set_cpu_variant(None)
