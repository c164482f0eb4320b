"""Usage and configuration mistakes are answered before torch is imported or a model loads.

Each case runs ``realscore`` in a subprocess whose driver reports whether ``torch`` was imported by
the time the command returned: that, not a timer, is what makes the answer immediate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_DRIVER = (
    "import sys\n"
    "from shared.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as stop:  # argparse's own usage errors\n"
    "    code = stop.code\n"
    "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def _realscore(
    args: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 60
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REALSCORE_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", _DRIVER, *args],
        env={**clean, "HF_HUB_OFFLINE": "1", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture()
def model_env(tiny_clip_dir: Path, seed_checkpoint: Path) -> dict[str, str]:
    return {"REALSCORE_MODEL": str(tiny_clip_dir), "REALSCORE_HEAD_WEIGHTS": str(seed_checkpoint)}


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["score", "x.png"], {"REALSCORE_MAX_BATCH_SIZE": "abc"}, "REALSCORE_MAX_BATCH_SIZE"),
        (["score", "--batch-size", "0", "x.png"], {}, "--batch-size"),
        (["submit", "--timeout", "-1", "x.png"], {}, "--timeout"),
        (["worker", "--bogus-flag"], {}, "No such option '--bogus-flag'"),
        (["worker", "--concurrency", "many"], {}, "--concurrency"),
        (["evaluate", "--real", "/no/such/real", "--ai", "/no/such/ai"], {}, "--real /no/such/real"),
        (["evaluate", "--real", ".", "--ai", ".", "--threshold", "2"], {}, "--threshold"),
        (["evaluate", "--real", ".", "--ai", ".", "--perturb", "sharpen:2"], {}, "unknown perturbation"),
        (["train", "--real", ".", "--ai", ".", "--out", "h.safetensors", "--epochs", "0"], {}, "--epochs"),
        (["train", "--real", ".", "--ai", ".", "--out", "h.safetensors", "--val-split", "0.9"], {}, "--val-split"),
        (["convert", "/no/such.pth", "--out", "h.safetensors"], {}, "checkpoint not found: /no/such.pth"),
    ],
)
def test_usage_errors_exit_2_before_torch(
    args: list[str], env: dict[str, str], says: str, model_env: dict[str, str]
) -> None:
    done = _realscore(args, {**model_env, **env})
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "torch not imported" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_local_tower_is_reported_before_torch(seed_checkpoint: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-tower"
    env = {"REALSCORE_MODEL": str(missing), "REALSCORE_HEAD_WEIGHTS": str(seed_checkpoint)}
    done = _realscore(["score", "x.png"], env)
    assert done.returncode == 2, done.stderr
    assert f"REALSCORE_MODEL={missing}: no such directory" in done.stderr
    assert "torch not imported" in done.stderr


def test_an_uncached_hub_tower_offline_is_reported_before_torch(seed_checkpoint: Path, tmp_path: Path) -> None:
    env = {
        "REALSCORE_MODEL": "realscore-tests/never-published",
        "REALSCORE_HEAD_WEIGHTS": str(seed_checkpoint),
        "HF_HOME": str(tmp_path / "hf"),
    }
    done = _realscore(["score", "x.png"], env)
    assert done.returncode == 2, done.stderr
    assert "not in the local hub cache" in done.stderr
    assert "torch not imported" in done.stderr


def test_missing_default_weights_list_the_paths_tried(tiny_clip_dir: Path, tmp_path: Path) -> None:
    done = _realscore(["score", "x.png"], {"REALSCORE_MODEL": str(tiny_clip_dir)}, cwd=tmp_path)
    if (REPO / "weights" / "modelo_final.pth").is_file():
        pytest.skip("this checkout has the seed's weights, so the default is found")
    assert done.returncode == 2, done.stderr
    assert str(tmp_path / "weights" / "modelo_final.pth") in done.stderr
    assert str(REPO / "weights" / "modelo_final.pth") in done.stderr
    assert "torch not imported" in done.stderr


@pytest.mark.parametrize("command", [["worker"], ["score", "x.png"]])
def test_missing_weights_exit_2_from_worker_and_score_alike(
    command: list[str], tiny_clip_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "modelo_final.pth"
    env = {"REALSCORE_MODEL": str(tiny_clip_dir), "REALSCORE_HEAD_WEIGHTS": str(missing)}
    done = _realscore(command, env)
    assert done.returncode == 2, done.stderr  # a configuration error: see README's exit codes
    assert str(missing) in done.stderr
    assert "torch not imported" in done.stderr


@pytest.fixture(scope="module")
def model_loading_runs(
    tiny_clip_dir: Path, seed_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, Future[subprocess.CompletedProcess]], Path]]:
    """The cases that get as far as loading the model (seconds each: they import torch and
    transformers) all start when the first of their tests asks, each in a thread of its own: on
    two cores three take about the time of two. Yields their runs by name, and the unloadable
    head file."""
    garbage = tmp_path_factory.mktemp("unloadable") / "head.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    on_cpu = {"REALSCORE_MODEL": str(tiny_clip_dir), "REALSCORE_DEVICE": "cpu", "TRANSFORMERS_OFFLINE": "1"}
    unloadable = {**on_cpu, "REALSCORE_HEAD_WEIGHTS": str(garbage)}
    cases = {
        "unloadable worker": (["worker"], unloadable),
        "unloadable score": (["score", "x.png"], unloadable),
        "cuda-graphs worker": (
            ["worker"],
            {**on_cpu, "REALSCORE_HEAD_WEIGHTS": str(seed_checkpoint), "REALSCORE_COMPILE": "cuda-graphs"},
        ),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        # A longer bound than one run alone needs: here they share the cores.
        yield {name: pool.submit(_realscore, args, env, timeout=180) for name, (args, env) in cases.items()}, garbage


@pytest.mark.parametrize("command", ["worker", "score"])
def test_weights_that_do_not_load_exit_2_from_worker_and_score_alike(
    command: str, model_loading_runs: tuple[dict[str, Future[subprocess.CompletedProcess]], Path]
) -> None:
    """Found, so past the pre-flight check, but the model cannot be built from them."""
    runs, garbage = model_loading_runs
    done = runs[f"unloadable {command}"].result()
    assert done.returncode == 2, done.stderr
    assert str(garbage) in done.stderr and "Traceback" not in done.stderr


REFUSED_DELIVERY = {  # valid values that `realscore worker` refuses together
    "REALSCORE_VISIBILITY_TIMEOUT": "60",
    "REALSCORE_FETCH_TIMEOUT": "30",
    "REALSCORE_FORWARD_TIMEOUT": "60",
}


@pytest.mark.parametrize("env", [{}, REFUSED_DELIVERY], ids=["defaults", "refused-delivery-settings"])
def test_worker_help_lists_celery_options_too(env: dict[str, str]) -> None:
    done = _realscore(["worker", "--help"], env)
    assert done.returncode == 0, done.stderr
    assert "VISIBILITY_TIMEOUT" not in done.stderr
    assert "--gpus" in done.stdout and "--concurrency" in done.stdout and "--hostname" in done.stdout
    assert "torch not imported" in done.stderr


def test_the_worker_refuses_those_delivery_settings_without_help() -> None:
    done = _realscore(["worker"], REFUSED_DELIVERY)
    assert done.returncode == 2 and "REALSCORE_VISIBILITY_TIMEOUT (60 s)" in done.stderr


BAD_SETTINGS = [
    {"REALSCORE_MAX_BATCH_SIZE": "abc"},  # a value that does not parse
    {"REALSCORE_MAX_BATCH_SIZ": "8"},  # no such setting
]
EVERY_COMMAND = [  # each with nothing but --help: help needs no other argument either
    [], ["worker"], ["score"], ["submit"], ["demo-model"], ["backfill"], ["convert"], ["evaluate"],
    ["train"],
]


@pytest.mark.parametrize("env", BAD_SETTINGS, ids=["bad-value", "unknown-variable"])
@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda c: c[0] if c else "realscore")
def test_help_prints_whatever_the_settings(command: list[str], env: dict[str, str]) -> None:
    """Help is what one reads to fix a bad setting. argparse prints the other commands' help while
    parsing; `worker --help` is answered by the command itself (it adds Celery's options), and
    used to read the settings first and refuse."""
    done = _realscore([*command, "--help"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {' '.join(['realscore', *command])} "), done.stdout[:200]
    assert "REALSCORE_MAX_BATCH_SIZ" not in done.stderr
    assert "torch not imported" in done.stderr


@pytest.mark.parametrize("env", BAD_SETTINGS, ids=["bad-value", "unknown-variable"])
@pytest.mark.parametrize(
    "command", [["worker"], ["worker", "--gpus", "0"], ["demo-model", "--out", "unused"]]
)
def test_without_help_a_bad_setting_is_refused_in_one_line(
    command: list[str], env: dict[str, str]
) -> None:
    (name,) = env
    done = _realscore(command, env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"realscore {command[0]}: {name}: ")
    assert "Traceback" not in done.stderr and "torch not imported" in done.stderr


def test_version() -> None:
    done = _realscore(["--version"], {})
    assert done.returncode == 0
    assert done.stdout.startswith("realscore ")


def test_default_weights_are_found_in_the_checkout_from_another_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from shared import model_files
    from shared.settings import load_settings

    checkout = tmp_path / "checkout"
    (checkout / "weights").mkdir(parents=True)
    (checkout / "weights" / "modelo_final.pth").write_bytes(b"weights")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(model_files, "_CHECKOUT", checkout)
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("REALSCORE_HEAD_WEIGHTS", raising=False)
    assert model_files.head_weights_path(load_settings()) == checkout / "weights" / "modelo_final.pth"
    # A path the user set is theirs: relative to the working directory, nowhere else.
    monkeypatch.setenv("REALSCORE_HEAD_WEIGHTS", "weights/modelo_final.pth")
    with pytest.raises(model_files.ModelFilesError, match=str(elsewhere / "weights")):
        model_files.head_weights_path(load_settings())


def test_cuda_graphs_on_a_cpu_exit_2_from_the_worker(
    model_loading_runs: tuple[dict[str, Future[subprocess.CompletedProcess]], Path]
) -> None:
    """The worker's start path (embedded commands share ScoringService's check: test_service)."""
    runs, _ = model_loading_runs
    done = runs["cuda-graphs worker"].result()
    assert done.returncode == 2, done.stderr
    assert "REALSCORE_COMPILE=cuda-graphs needs a CUDA device" in done.stderr
    assert "Traceback" not in done.stderr
