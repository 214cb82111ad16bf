"""Push to / load from the Hub, offline: the real ``huggingface_hub`` client against a local Hub-protocol server.

``local_hub`` (from ``diffusers_raven.testing.hub_server``) starts a ``LocalHubServer`` on 127.0.0.1, points
``huggingface_hub`` at it (an HTTP client factory that sends the Hub's requests to the server; Xet disabled),
turns the offline mode set by ``conftest.py`` off for the test only (``HF_HUB_OFFLINE`` unset and
``huggingface_hub.constants.HF_HUB_OFFLINE = False``) and uses a temporary HF home / cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder

from diffusers_raven.testing import hub_server as hub_fixtures
from diffusers_raven.testing.hub_server import LocalHubServer, use_hub_endpoint

# pytest fixtures: ``local_hub`` (server + client pointed at it + temporary HF home) needs ``hub_server``
hub_server = hub_fixtures.hub_server
local_hub = hub_fixtures.local_hub
LFS_BATCH = "info/lfs/objects/batch"


def _called(server: LocalHubServer, method: str, fragment: str) -> bool:
    return any(m == method and fragment in path for m, path in server.requests)


def test_create_upload_list_download_roundtrip(local_hub: LocalHubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=local_hub.endpoint, token="x")
    assert api.whoami()["name"] == "tester"
    url = api.create_repo("tester/roundtrip")
    assert url.repo_id == "tester/roundtrip"
    with pytest.raises(HfHubHTTPError) as err:  # exists, and no exist_ok
        api.create_repo("tester/roundtrip")
    assert err.value.response.status_code == 409
    assert api.create_repo("tester/roundtrip", exist_ok=True).repo_id == "tester/roundtrip"

    folder = tmp_path / "upload"
    (folder / "weights").mkdir(parents=True)
    text = "hello hub\n" * 3
    (folder / "notes.txt").write_text(text)
    blob = np.random.default_rng(0).integers(0, 256, size=1_500_000, dtype=np.uint8).tobytes()
    (folder / "weights" / "big.bin").write_bytes(blob)
    head_before = local_hub.head("tester/roundtrip")
    commit = api.upload_folder(repo_id="tester/roundtrip", folder_path=folder, commit_message="add files")
    assert commit.oid != head_before and len(commit.oid) == 40 and local_hub.head("tester/roundtrip") == commit.oid
    # the binary file went through the LFS batch API and the upload URL it returned, the text file inline
    assert _called(local_hub, "POST", f"/tester/roundtrip.git/{LFS_BATCH}")
    assert _called(local_hub, "PUT", "/_lfs/upload/")

    tree = {entry.path: entry for entry in api.list_repo_tree("tester/roundtrip", recursive=True)}
    assert set(tree) == {".gitattributes", "notes.txt", "weights", "weights/big.bin"}
    assert isinstance(tree["weights"], RepoFolder)
    big, notes = tree["weights/big.bin"], tree["notes.txt"]
    assert isinstance(big, RepoFile) and big.size == len(blob) and big.lfs is not None and big.lfs.size == len(blob)
    assert isinstance(notes, RepoFile) and notes.lfs is None and notes.size == len(text.encode())
    assert [e.path for e in api.list_repo_tree("tester/roundtrip", path_in_repo="weights")] == ["weights/big.bin"]
    assert api.model_info("tester/roundtrip").sha == commit.oid

    cache = tmp_path / "cache"
    for name, expected in (("notes.txt", text.encode()), ("weights/big.bin", blob)):
        path = hf_hub_download("tester/roundtrip", name, endpoint=local_hub.endpoint, cache_dir=cache)
        assert Path(path).read_bytes() == expected
        assert f"snapshots{os.sep}{commit.oid}" in path

    # a second identical upload is a no-op, a deletion makes a new commit
    assert api.upload_folder(repo_id="tester/roundtrip", folder_path=folder).oid == commit.oid
    deletion = api.delete_file("notes.txt", repo_id="tester/roundtrip")
    assert deletion.oid != commit.oid
    assert "notes.txt" not in api.list_repo_files("tester/roundtrip")
    assert local_hub.file_bytes("tester/roundtrip", "notes.txt", revision=commit.oid) == text.encode()


def _tiny_pipeline():
    from diffusers_raven import CausalVideoPipeline, CausalWanTransformer3DModel, ConsistencyFlowMatchScheduler
    from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_transformer_config, tiny_vae

    torch.manual_seed(0)
    tok = build_word_tokenizer()
    pipe = CausalVideoPipeline(
        tokenizer=tok,
        text_encoder=tiny_text_encoder(len(tok)),
        transformer=CausalWanTransformer3DModel(**tiny_transformer_config()),
        vae=tiny_vae(),
        scheduler=ConsistencyFlowMatchScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(pipe) -> np.ndarray:
    out = pipe(
        "a red circle",
        num_frames=9,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=16,
    )
    return np.asarray(out.frames)


def test_pipeline_push_to_hub_and_from_pretrained(
    local_hub: LocalHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers_raven import CausalVideoPipeline

    # conftest.py sets HF_HUB_OFFLINE=1 for the whole session: online for this test only (``local_hub`` does the
    # same, this states it where it matters)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    pipe = _tiny_pipeline()
    expected = _frames(pipe)

    pipe.push_to_hub("tester/tiny-causal", token="x")
    files = set(HfApi().list_repo_files("tester/tiny-causal"))
    assert {"model_index.json", "README.md", "transformer/config.json", "scheduler/scheduler_config.json"} <= files
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert _called(local_hub, "POST", f"/tester/tiny-causal.git/{LFS_BATCH}")  # safetensors went through LFS

    index = json.loads(local_hub.file_bytes("tester/tiny-causal", "model_index.json"))
    assert index["_class_name"] == "CausalVideoPipeline"
    assert index["transformer"] == ["diffusers_raven", "CausalWanTransformer3DModel"]
    assert index["scheduler"] == ["diffusers_raven", "ConsistencyFlowMatchScheduler"]

    cache = tmp_path / "hf-cache"
    loaded = CausalVideoPipeline.from_pretrained("tester/tiny-causal", cache_dir=str(cache))
    loaded.set_progress_bar_config(disable=True)
    assert (cache / "models--tester--tiny-causal").is_dir()  # downloaded into the given cache only
    assert type(loaded.transformer).__name__ == "CausalWanTransformer3DModel"
    assert type(loaded.scheduler).__name__ == "ConsistencyFlowMatchScheduler"
    np.testing.assert_allclose(_frames(loaded), expected, atol=1e-4)


# diffusers' ModelMixin.from_pretrained still passes the deprecated ``local_dir_use_symlinks`` to ``hf_hub_download``
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
def test_transformer_push_and_load_by_repo_id(local_hub: LocalHubServer, tmp_path: Path) -> None:
    from diffusers_raven import CausalWanTransformer3DModel
    from diffusers_raven.utils.tiny import tiny_transformer_config

    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**tiny_transformer_config()).eval()
    model.push_to_hub("tester/tiny-transformer", token="x")
    loaded = CausalWanTransformer3DModel.from_pretrained("tester/tiny-transformer", cache_dir=str(tmp_path / "c"))
    config = json.loads(json.dumps(tiny_transformer_config()))  # tuples -> lists, as read back from config.json
    assert {key: loaded.config[key] for key in config} == config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_missing_repo_gives_file_not_found(local_hub: LocalHubServer, tmp_path: Path) -> None:
    from diffusers_raven import CausalVideoPipeline

    with pytest.raises(FileNotFoundError, match="tester/does-not-exist") as err:
        CausalVideoPipeline.from_pretrained("tester/does-not-exist", cache_dir=str(tmp_path / "cache"))
    assert isinstance(err.value.__cause__, RepositoryNotFoundError)


def test_use_hub_endpoint_restores_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    import huggingface_hub.hf_api as hf_api
    from huggingface_hub.utils import _http

    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint, constants.HF_HUB_OFFLINE)
    before_xet, before_env = constants.HF_HUB_DISABLE_XET, os.environ.get("HF_ENDPOINT")
    before_factory = _http._GLOBAL_CLIENT_FACTORY
    with LocalHubServer() as server, use_hub_endpoint(server.endpoint):
        # the endpoint settings keep their value: the client's requests for the Hub host are sent to the server
        assert (constants.ENDPOINT, hf_api.api.endpoint, HfApi().endpoint) == (before[0],) * 3
        assert HfApi(token="x").whoami()["name"] == "tester"
        assert HfApi(endpoint=server.endpoint, token="x").create_repo("tester/direct").repo_id == "tester/direct"
        assert hf_api.api.create_repo("tester/default", token="x").url == f"{constants.ENDPOINT}/tester/default"
        assert server.repo_ids() == ["tester/default", "tester/direct"]
        assert constants.HF_HUB_DISABLE_XET is True and constants.HF_HUB_OFFLINE is False
        assert os.environ["HF_ENDPOINT"] == server.endpoint
        # a subprocess reads HF_ENDPOINT at import and talks to the server directly
        probe = "from huggingface_hub import HfApi, constants; print(constants.ENDPOINT, HfApi(token='x').whoami()['name'])"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
        assert out.stdout.split() == [server.endpoint, "tester"]
        with pytest.raises(RuntimeError, match="does not reach other hosts"):
            _http.get_session().get("https://example.com/")
        root = server.root
        assert root.is_dir()
    assert not root.exists()  # temporary storage removed by stop()
    after = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint, constants.HF_HUB_OFFLINE)
    assert after == before and constants.HF_HUB_DISABLE_XET == before_xet
    assert os.environ.get("HF_ENDPOINT") == before_env
    assert _http._GLOBAL_CLIENT_FACTORY is before_factory


def test_server_errors_and_persistence(tmp_path: Path) -> None:
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    with LocalHubServer(tmp_path / "hub", token="secret") as server, use_hub_endpoint(server.endpoint):
        api = HfApi(token="secret")
        api.create_repo("tester/persist")
        api.upload_file(path_or_fileobj=b"abc", path_in_repo="a.txt", repo_id="tester/persist")
        with pytest.raises(HfHubHTTPError, match="401"):
            HfApi(token="wrong").create_repo("tester/other")
        with pytest.raises(EntryNotFoundError):
            hf_hub_download("tester/persist", "missing.txt", cache_dir=tmp_path / "c", token="secret")
        with pytest.raises(RevisionNotFoundError):
            api.model_info("tester/persist", revision="no-such-branch")
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("tester/nothing-here")
        head = server.head("tester/persist")
    # the same directory serves the same repositories again
    with LocalHubServer(tmp_path / "hub") as again:
        assert again.repo_ids() == ["tester/persist"] and again.head("tester/persist") == head
        assert again.file_bytes("tester/persist", "a.txt") == b"abc"
