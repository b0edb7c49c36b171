"""Extensions through the REST API of a real server: list, install from a git repository, enable, generate with
alwayson_scripts (A1111's shape, by position and by name), extension routes and hooks, update, remove."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.api.conftest import ApiServer, data_dir_with_models, start_server, stop_server
from tests.fixtures.extension_repos import commit_files, make_repo, stamp_extension


@pytest.fixture(scope="module")
def ext_api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiServer]:
    """A server whose data folder already holds the enabled `stamp` extension (so its route exists at start)."""
    data_dir = data_dir_with_models(tmp_path_factory.mktemp("ext-api-data"), tiny_model_dir)
    make_repo(data_dir / "extensions" / "stamp", stamp_extension("v1"))
    (data_dir / "extensions.json").write_text(json.dumps({"enabled": ["stamp"]}))
    server = start_server(data_dir, [], data_dir / "server.log")
    yield server
    stop_server(server)


def txt2img(server: ApiServer, **body: Any) -> requests.Response:
    payload = {"prompt": "a tower", "steps": 2, "width": 64, "height": 64, "seed": 5, "send_images": False, **body}
    return requests.post(f"{server.url}/sdapi/v1/txt2img", json=payload, timeout=300)


def first_infotext(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])["infotexts"][0]


def test_generate_with_alwayson_scripts_and_extension_routes(ext_api: ApiServer) -> None:
    url = ext_api.url
    listed = {item["name"]: item for item in requests.get(f"{url}/api/v1/extensions", timeout=30).json()}
    assert listed["stamp"]["status"] == "enabled" and listed["cfg_rescale"]["builtin"]
    a1111 = {item["name"]: item for item in requests.get(f"{url}/sdapi/v1/extensions", timeout=30).json()}
    assert set(a1111["stamp"]) == {"name", "remote", "branch", "commit_hash", "commit_date", "version", "enabled"}
    assert a1111["stamp"]["enabled"] is True and len(a1111["stamp"]["commit_hash"]) == 40
    for name in ("cfg_rescale", "wildcards"):
        response = requests.post(f"{url}/api/v1/extensions/{name}/enable", timeout=30)
        assert response.status_code == 200, response.text
    assert requests.get(f"{url}/sdapi/v1/scripts", timeout=30).json()["txt2img"] == ["cfg rescale", "stamp"]

    alwayson = {"CFG Rescale": {"args": [0.7]}, "stamp": {"args": {"enabled": True, "label": "from the api"}}}
    infotext = first_infotext(txt2img(ext_api, prompt="a __color__ tower", alwayson_scripts=alwayson))
    assert "CFG Rescale: 0.7" in infotext and "Stamp: v1" in infotext and "Stamp label: from the api" in infotext
    assert "Template: a __color__ tower" in infotext
    again = first_infotext(txt2img(ext_api, prompt="a __color__ tower", alwayson_scripts=alwayson))
    assert again.splitlines()[0] == infotext.splitlines()[0]  # same seed → same wildcard choice
    assert "CFG Rescale" not in first_infotext(txt2img(ext_api))

    bad = txt2img(ext_api, alwayson_scripts={"CFG Rescale": {"args": [2]}})
    assert bad.status_code == 422 and "extensions.cfg_rescale.multiplier: must be between 0 and 1" in bad.text
    unknown = txt2img(ext_api, alwayson_scripts={"ADetailer": {"args": [True]}})
    assert unknown.status_code == 422 and "always on script 'ADetailer' not found" in unknown.text

    # Routes added at APP_STARTED, with what MODEL_LOADED saw.
    route = requests.get(f"{url}/stamp/version", timeout=30).json()
    assert route["stamp"] == "v1" and route["models_loaded"][-1].startswith("tiny")


def test_install_update_remove_through_the_api(ext_api: ApiServer, tmp_path: Path) -> None:
    url = ext_api.url
    repo = make_repo(tmp_path / "other", stamp_extension("v1", name="other_stamp"))
    response = requests.post(f"{url}/api/v1/extensions/install", json={"url": str(repo)}, timeout=120)
    assert response.status_code == 200 and "Installed other_stamp 1.0.0" in response.json()["message"]
    again = requests.post(f"{url}/api/v1/extensions/install", json={"url": str(repo)}, timeout=120)
    assert again.status_code == 400 and "already installed" in again.json()["detail"]
    folder = ext_api.data_dir / "extensions" / "other_stamp"
    assert not (folder / "imported.marker").exists()

    commit = commit_files(repo, stamp_extension("v2", name="other_stamp"), "v2")
    check = requests.post(f"{url}/api/v1/extensions/other_stamp/check", timeout=120).json()
    assert check == {"name": "other_stamp", "status": "behind 1 commit"}
    assert "Updated other_stamp" in requests.post(f"{url}/api/v1/extensions/other_stamp/update", timeout=120).text
    info = requests.get(f"{url}/api/v1/extensions/other_stamp", timeout=30).json()
    assert (info["commit"], info["version"], info["enabled"]) == (commit, "2.0.0", False)

    assert requests.delete(f"{url}/api/v1/extensions/other_stamp", timeout=60).status_code == 200
    assert not folder.exists()
    assert requests.get(f"{url}/api/v1/extensions/other_stamp", timeout=30).status_code == 404
    builtin = requests.delete(f"{url}/api/v1/extensions/wildcards", timeout=60)
    assert builtin.status_code == 400 and "built in" in builtin.json()["detail"]


def test_install_into_a_folder_of_the_users_choice(ext_api: ApiServer, tmp_path: Path) -> None:
    url = ext_api.url
    repo = make_repo(tmp_path / "named", stamp_extension("v1", name="named_stamp"))
    response = requests.post(f"{url}/api/v1/extensions/install", json={"url": str(repo), "folder": "myfolder"},
                             timeout=120)
    assert response.status_code == 200, response.text
    assert "Installed named_stamp 1.0.0 into myfolder/" in response.json()["message"]
    assert (ext_api.data_dir / "extensions" / "myfolder" / "extension.toml").is_file()
    # Known by its manifest's name, as the list shows it.
    info = requests.get(f"{url}/api/v1/extensions/named_stamp", timeout=30).json()
    assert info["name"] == "named_stamp" and info["enabled"] is False
    assert requests.delete(f"{url}/api/v1/extensions/named_stamp", timeout=60).status_code == 200
    assert not (ext_api.data_dir / "extensions" / "myfolder").exists()
