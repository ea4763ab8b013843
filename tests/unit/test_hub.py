"""A model named by its Hugging Face repo id, as vLLM takes one: found in the local Hugging Face
cache (shared/hub.py) by every service's settings and by `tandem serve`, served under the repo
id; one not in the cache is refused with the command that fetches it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared import hub
from shared.config import ConfigError, SchedulerConfig, WorkerConfig, from_env
from tools import run_local

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models/tandem-demo-code"


def cached(hub_cache: Path, repo_id: str, commit: str, *, ref: str | None = "main", source: Path | None = None) -> Path:
    """A repo in the cache's layout, as `hf download` leaves it; the snapshot's directory."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    if source is not None:
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_a_repo_id_is_its_snapshot_in_the_cache(tmp_path):
    env = {"HF_HOME": str(tmp_path)}
    main = cached(tmp_path / "hub", "org/tiny", "c0ffee")
    v1 = cached(tmp_path / "hub", "org/tiny", "beef01", ref="v1")
    pinned = cached(tmp_path / "hub", "org/tiny", "5eed", ref=None)
    assert hub.resolve("org/tiny", env) == (str(main), "org/tiny")
    assert hub.resolve("org/tiny@v1", env) == (str(v1), "org/tiny")
    assert hub.resolve("org/tiny@5eed", env) == (str(pinned), "org/tiny")


def test_where_the_cache_is():
    assert hub.cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert hub.cache_dir({"HF_HOME": "/b"}) == Path("/b/hub")
    assert hub.cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert hub.cache_dir({}) == Path("~/.cache/huggingface/hub").expanduser()


def test_a_path_is_taken_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert hub.resolve("models/mine", {"HF_HOME": str(tmp_path)}) == ("models/mine", None)
    assert hub.resolve(str(DEMO / "target")) == (str(DEMO / "target"), None)
    assert hub.resolve("") == ("", None)


def test_a_repo_id_not_in_the_cache_says_how_to_fetch_it(tmp_path):
    env = {"HF_HOME": str(tmp_path)}
    with pytest.raises(hub.ModelNotFound) as e:
        hub.resolve("Qwen/Qwen3-0.6B", env)
    assert "`hf download Qwen/Qwen3-0.6B`" in str(e.value) and str(tmp_path / "hub") in str(e.value)
    cached(tmp_path / "hub", "org/tiny", "c0ffee")
    with pytest.raises(hub.ModelNotFound, match="--revision v2"):
        hub.resolve("org/tiny@v2", env)
    # a snapshot without config.json (a download cut short) is no model
    (tmp_path / "hub/models--org--tiny/snapshots/c0ffee/config.json").unlink()
    with pytest.raises(hub.ModelNotFound):
        hub.resolve("org/tiny", env)


def test_every_service_takes_a_repo_id_and_serves_it_under_that_name(tmp_path):
    snapshot = cached(tmp_path / "hub", "org/tiny", "c0ffee")
    draft = cached(tmp_path / "hub", "org/tiny-draft", "d1")
    env = {"HF_HOME": str(tmp_path), "TANDEM_MODEL": "org/tiny"}
    scheduler = from_env(SchedulerConfig, env)
    assert scheduler.model == str(snapshot) and scheduler.model_name == "org/tiny"
    worker = from_env(WorkerConfig, {**env, "TANDEM_ROLE": "decode", "TANDEM_DRAFT_MODEL": "org/tiny-draft"})
    assert worker.model == str(snapshot) and worker.model_name == "org/tiny" and worker.draft_model == str(draft)
    named = from_env(SchedulerConfig, {**env, "TANDEM_MODEL_NAME": "mine"})
    assert named.model_name == "mine"
    with pytest.raises(ConfigError, match=r"^TANDEM_MODEL: org/other is not a directory.*hf download org/other"):
        from_env(SchedulerConfig, {**env, "TANDEM_MODEL": "org/other"})


def _planned(monkeypatch) -> dict[str, dict[str, str]]:
    started: dict[str, dict[str, str]] = {}
    monkeypatch.setattr(run_local, "start", lambda name, module, env: started.setdefault(name, env))
    monkeypatch.setattr(run_local, "wait_healthy", lambda *_: (_ for _ in ()).throw(RuntimeError("planned only")))
    monkeypatch.setattr(run_local, "stop_all", lambda procs, grace_s: 0)
    return started


def test_serve_takes_a_cached_repo_id(tmp_path, monkeypatch, capsys):
    snapshot = cached(tmp_path / "hub", "org/demo", "c0ffee", source=DEMO / "target")
    draft = cached(tmp_path / "hub", "org/demo-draft", "d1", source=DEMO / "draft")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    started = _planned(monkeypatch)
    assert run_local.main(["--model", "org/demo", "--draft-model", "org/demo-draft", "--spec", "draft"]) == 1
    assert {env["TANDEM_MODEL"] for name, env in started.items() if name != "draft"} == {str(snapshot)}
    assert {env["TANDEM_MODEL_NAME"] for name, env in started.items() if name != "draft"} == {"org/demo"}
    assert started["draft"]["TANDEM_MODEL"] == str(draft) and started["draft"]["TANDEM_MODEL_NAME"] == "org/demo-draft"
    started.clear()
    assert run_local.main(["--model", "org/missing"]) == 2
    assert not started and "`hf download org/missing`" in capsys.readouterr().err
