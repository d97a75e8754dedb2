"""The conformance suite itself: the built-in backends and the documented
example adapter pass it; both entry points (console command and pytest)
work from the repository and from an installed copy; the report and its
JSON are what docs/conformance.md says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conformance import PROFILES, Status, run_suite
from conformance.report import format_report, report_json

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
SDPA = "conformance.examples.sdpa_backend:SDPABackend"


def run(cmd, cwd=ROOT, env=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- built-in backends
@pytest.fixture(scope="module")
def reference_report():
    return run_suite("reference", device="cpu", profile="quick")


def test_reference_backend_passes_the_quick_profile(reference_report):
    assert reference_report.ok, "\n\n".join(r.message for r in reference_report.failed)
    by = {r.check_id: r for r in reference_report.results}
    must_pass = [f"feature/{f}" for f in ("sliding_window", "softcap", "alibi", "alibi_sqrt", "sinks", "combinations")]
    must_pass += ["capabilities", "semantics/base", "gqa", "batch/decode", "batch/multi_token_decode",
                  "batch/chunked_prefill", "batch/full_prefill", "batch/empty", "batch/mixed", "block_boundaries",
                  "long_context", "output_padding", "profiling_run", "determinism", "functional_api",
                  "strided_kv_cache", "engine_step", "cache_writer", "cache_writer/negative_slots",
                  "dtype/float16", "dtype/bfloat16", "dtype/float32", "head_size/192x128", "block_size/16"]
    for cid in must_pass:
        assert by[cid].status is Status.PASS, (cid, by[cid].message)
    for cid in ("kv_cache_dtype/fp8", "kv_cache_dtype/int8_per_token_head", "unsupported/chunk_lookback",
                "unsupported/attn_type=encoder", "unsupported/output_scale", "unsupported/cascade",
                "unsupported/all_reasons", "block_size/8", "block_size/512", "head_size/16x32", "head_size/64x16"):
        assert by[cid].status is Status.REJECTED, (cid, by[cid].message)
    assert by["cuda_graph"].status is Status.NOT_DECLARED
    assert sum(1 for r in reference_report.results if r.check_id.startswith("malformed/")) >= 15
    # hypothesis rows really drew examples on top of their targeted cases
    assert by["semantics/base"].cases >= PROFILES["quick"].max_examples
    assert reference_report.seconds < 180, f"quick profile took {reference_report.seconds:.0f}s"


def test_report_table_and_json(reference_report):
    text = format_report(reference_report)
    assert "RESULT: PASSED" in text
    assert re.search(r"sliding_window\s+pass", text)
    assert re.search(r"kv_cache_dtype='fp8'\s+unsupported, correctly rejected", text)
    assert re.search(r"CUDA-graph capture of forward\s+not declared", text)
    data = json.loads(json.dumps(report_json(reference_report)))
    assert data["passed"] is True and data["summary"]["fail"] == 0
    assert data["backend"] == "diffkv.reference.backend:ReferenceBackend"
    assert [r["id"] for r in data["results"]] == [r.check_id for r in reference_report.results]
    assert set(data["results"][0]) == {"id", "section", "feature", "status", "message", "reproducer", "cases",
                                       "seconds"}


def _triton_available() -> bool:
    try:
        import diffkv.triton.backend  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.interpreter
@pytest.mark.skipif(HAS_CUDA, reason="GPU machine: see the gpu-marked test")
@pytest.mark.skipif(not _triton_available(), reason="diffkv.triton.backend not importable")
def test_triton_backend_passes_every_check_in_the_interpreter():
    """Every row, with fewer drawn examples (the targeted cases all run), every
    declared dtype: bf16 included, as the kernels widen bf16 dot operands in the
    interpreter, whose bf16 dot is wrong (SPEC section 6)."""
    profile = replace(PROFILES["quick"], max_examples=3, long_examples=1)
    report = run_suite("triton", device="cpu", profile=profile)
    assert report.ok, "\n\n".join(r.message for r in report.failed)
    statuses = {r.check_id: r.status for r in report.results}
    assert statuses["dtype/bfloat16"] is Status.PASS and statuses["cuda_graph"] is Status.SKIPPED
    assert statuses["feature/sinks"] is Status.PASS and statuses["dtype/float64"] is Status.REJECTED


@pytest.mark.gpu
@pytest.mark.skipif(not _triton_available(), reason="diffkv.triton.backend not importable")
def test_triton_backend_passes_the_quick_profile_on_gpu():
    report = run_suite("triton", device="cuda", profile="quick")
    assert report.ok, "\n\n".join(r.message for r in report.failed)
    assert {r.check_id: r.status for r in report.results}["cuda_graph"] is Status.PASS


# --------------------------------------------------------------------------- the documented example
def test_sdpa_example_adapter_passes_and_its_undeclared_features_are_rejected():
    report = run_suite(SDPA, device="cpu", profile="quick")
    assert report.ok, "\n\n".join(r.message for r in report.failed)
    st = {r.check_id: r.status for r in report.results}
    assert st["feature/sliding_window"] is Status.PASS and st["feature/alibi"] is Status.PASS
    assert st["gqa"] is Status.PASS and st["cache_writer/negative_slots"] is Status.PASS
    assert st["feature/softcap"] is Status.REJECTED and st["feature/sinks"] is Status.REJECTED
    assert st["dtype/float64"] is Status.REJECTED


def test_docs_show_the_example_adapter_verbatim():
    """The adapter code printed in docs/conformance.md is the file the test above runs."""
    doc = (ROOT / "docs" / "conformance.md").read_text()
    src = (ROOT / "conformance" / "examples" / "sdpa_backend.py").read_text()
    blocks = re.findall(r"```python\n# conformance/examples/sdpa_backend\.py.*?\n(.*?)```", doc, re.S)
    assert blocks, "docs/conformance.md must show the adapter from conformance/examples/sdpa_backend.py"
    for block in blocks:
        assert block.strip() in src, "docs/conformance.md shows adapter code that differs from the tested file"


# --------------------------------------------------------------------------- entry points
def test_console_command_passes_writes_json_and_exits_zero(tmp_path):
    out = tmp_path / "report.json"
    r = run([sys.executable, "-m", "conformance", "--backend", "reference", "--profile", "quick", "--device", "cpu",
             "--checks", "feature/sinks,kv_cache_dtype/fp8,malformed/query_rank", "--report", str(out), "-q"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: PASSED" in r.stdout and "unsupported, correctly rejected" in r.stdout
    data = json.loads(out.read_text())
    assert {x["id"]: x["status"] for x in data["results"]} == {
        "feature/sinks": "pass", "kv_cache_dtype/fp8": "unsupported", "malformed/query_rank": "pass"}


def test_console_command_fails_a_wrong_backend_with_a_reproducer():
    exe = Path(sys.executable).parent / "diffkv-conformance"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "conformance"]
    r = run(cmd + ["--backend", "tests.planted_bugs:WindowOffByOne", "--checks", "feature/sliding_window", "-q"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL feature/sliding_window" in r.stdout and "RESULT: FAILED" in r.stdout
    code = r.stdout.split("re-run it with):\n", 1)[1].split("\n\n", 1)[0]
    assert "reproduce(" in code and "LayerFeatures(sliding_window=" in code
    with pytest.raises(AssertionError, match="sliding_window"):
        exec(re.sub(r"^    ", "", code, flags=re.M), {})


def test_console_command_usage_errors_exit_two():
    assert run([sys.executable, "-m", "conformance", "--backend", "no.such.module:Backend"]).returncode == 2
    assert run([sys.executable, "-m", "conformance", "--backend", "reference", "--checks", "nothing*"]).returncode == 2
    listed = run([sys.executable, "-m", "conformance", "--backend", "reference", "--list"])
    assert listed.returncode == 0 and "feature/sliding_window" in listed.stdout


def test_pytest_entry_point_from_the_repository(tmp_path):
    out = tmp_path / "pytest_report.json"
    ok = run([sys.executable, "-m", "pytest", "conformance", "--backend", "reference", "-q", "-p", "no:cacheprovider",
              "-k", "feature/sinks or chunk_lookback or query_rank", "--diffkv-report", str(out)])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "3 passed" in ok.stdout and "diffkv conformance" in ok.stdout
    assert {x["id"] for x in json.loads(out.read_text())["results"]} == {
        "feature/sinks", "unsupported/chunk_lookback", "malformed/query_rank"}
    bad = run([sys.executable, "-m", "pytest", "conformance", "--backend", "tests.planted_bugs:PaddingRowsWritten",
               "-q", "-p", "no:cacheprovider", "-k", "output_padding"])
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "padding" in bad.stdout and "reproduce(" in bad.stdout
    none = run([sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:cacheprovider", "-rs"])
    assert none.returncode == 0 and "needs a backend" in none.stdout


def test_pytest_plugin_only_adds_options_and_imports_nothing_heavy():
    r = run([sys.executable, "-c", "import sys, conformance.plugin; print('torch' in sys.modules)"])
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
    h = run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=ROOT / "tests")
    if "--diffkv-backend" not in h.stdout:
        pytest.skip("the pytest11 entry point is not installed in this environment (pip install -e .)")
    assert "--diffkv-profile" in h.stdout and "--diffkv-report" in h.stdout


def test_both_entry_points_from_an_installed_copy(tmp_path):
    """pip-install the package (no deps) into a folder and use it from elsewhere."""
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("diffkv", "conformance"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
             "--target", str(site), str(src)], cwd=tmp_path)
    if r.returncode != 0:
        pytest.skip(f"cannot build the package here: {r.stderr[-500:]}")
    env = {"PYTHONPATH": str(site)}
    where = run([sys.executable, "-c", "import conformance, diffkv; print(conformance.__file__)"], cwd=tmp_path,
                env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    cli = run([sys.executable, str(site / "bin" / "diffkv-conformance"), "--backend", SDPA, "--checks",
               "feature/softcap,feature/alibi", "-q"], cwd=tmp_path, env=env)
    assert cli.returncode == 0 and "RESULT: PASSED" in cli.stdout, cli.stdout + cli.stderr
    pt = run([sys.executable, "-m", "pytest", "--pyargs", "conformance", "--diffkv-backend", "reference", "-q",
              "-p", "no:cacheprovider", "-k", "feature/sinks or query_rank"], cwd=tmp_path, env=env)
    assert pt.returncode == 0 and "2 passed" in pt.stdout, pt.stdout + pt.stderr
