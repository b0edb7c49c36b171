"""ExtensionHost with real git repositories on disk and the real engine (tiny model): loading, isolation of failures,
install/update/remove with git, requirements, safe mode, values ⇄ params/infotext, and the two shipped extensions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cpu_models import load_on_cpu
from tests.fixtures.extension_repos import (
    BAD_MANIFEST,
    BROKEN_IMPORT,
    RAISING_HOOK,
    SHIPPED_EXTENSIONS,
    GitDaemon,
    commit_files,
    git,
    make_repo,
    manifest,
    stamp_extension,
)
from webui.app.extensions import (
    STATUS_DISABLED,
    STATUS_ENABLED,
    STATUS_FAILED,
    STATUS_SAFE_MODE,
    ExtensionAccessError,
    ExtensionError,
    ExtensionHost,
)
from webui.core.hooks import BeforeGenerationContext, HookPoint, InfotextPastedContext
from webui.core.infotext import parse_infotext
from webui.core.params import GenerationParams, ParamError


def make_host(root: Path, **options: object) -> ExtensionHost:
    host = ExtensionHost(
        user_dir=root / "extensions", builtin_dir=SHIPPED_EXTENSIONS, state_file=root / "extensions.json",
        data_dir=root, webui_version="0.1.0", **options,  # type: ignore[arg-type]
    )
    host.start()
    return host


def status_of(host: ExtensionHost, name: str) -> str:
    return host.get(name).status


# -- discovery, safe loading -----------------------------------------------------------------------------------------


def test_shipped_extensions_are_listed_disabled_and_nothing_is_loaded(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    infos = {info.name: info for info in host.list_extensions()}
    assert {"wildcards", "cfg_rescale"} <= set(infos)
    assert all(info.builtin and not info.enabled and info.status == STATUS_DISABLED for info in infos.values())
    assert host.sections() == [] and not host.has(HookPoint.CFG)


def test_install_runs_no_code_and_enable_loads_it(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repos" / "stamp", stamp_extension("v1"))
    host = make_host(tmp_path / "data")
    message = host.install(str(repo))
    installed = tmp_path / "data" / "extensions" / "stamp"
    assert "Installed stamp 1.0.0" in message and (installed / "__init__.py").is_file()
    assert not (installed / "imported.marker").exists()
    assert status_of(host, "stamp") == STATUS_DISABLED
    info = host.get("stamp")
    assert info.remote == str(repo) and info.branch == "main" and len(info.commit) == 40

    assert "Enabled stamp" in host.enable("stamp")
    assert (installed / "imported.marker").read_text() == "v1"
    assert status_of(host, "stamp") == STATUS_ENABLED
    assert [section.extension for section in host.sections()] == ["stamp"]
    # Persisted: a new host (a restart) loads it again.
    assert json.loads((tmp_path / "data" / "extensions.json").read_text())["enabled"] == ["stamp"]
    assert status_of(make_host(tmp_path / "data"), "stamp") == STATUS_ENABLED
    host.mark_ui_built()
    assert host.reload_needed() == []
    host.disable("stamp")
    assert host.sections() == [] and host.reload_needed() == ["stamp"]
    assert json.loads((tmp_path / "data" / "extensions.json").read_text())["enabled"] == []


def test_update_fast_forwards_and_remove_deletes(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repos" / "stamp", stamp_extension("v1"))
    host = make_host(tmp_path / "data")
    host.install(str(repo))
    assert host.check_updates("stamp") == "latest"
    new_commit = commit_files(repo, stamp_extension("v2"), "second version")
    assert host.check_updates("stamp") == "behind 1 commit"
    assert "Reload UI" in host.update("stamp")
    info = host.get("stamp")
    assert (info.commit, info.version) == (new_commit, "2.0.0")
    assert host.check_updates("stamp") == "latest"
    host.remove("stamp")
    assert not (tmp_path / "data" / "extensions" / "stamp").exists()
    assert "stamp" not in {info.name for info in host.list_extensions()}
    with pytest.raises(ExtensionError, match="no extension named"):
        host.get("stamp")


def test_install_from_git_daemon_with_a_branch(tmp_path: Path) -> None:
    repos = tmp_path / "served"
    repo = make_repo(repos / "stamp.git", stamp_extension("v1"))
    git(repo, "checkout", "--quiet", "-b", "beta")
    commit_files(repo, stamp_extension("v3"), "beta version")
    git(repo, "checkout", "--quiet", "main")
    host = make_host(tmp_path / "data")
    with GitDaemon(repos) as daemon:
        assert "Installed stamp 3.0.0" in host.install(daemon.url("stamp.git"), branch="beta")
        with pytest.raises(ExtensionError, match="already installed"):
            host.install(daemon.url("stamp.git"))
    assert host.get("stamp").branch == "beta"


def test_bad_url_and_bad_branch_are_refused_without_running_git(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    for url in ("", "--upload-pack=touch /tmp/x", "has space"):
        with pytest.raises(ExtensionError, match="not a git URL"):
            host.install(url)
    with pytest.raises(ExtensionError, match="not a branch name"):
        host.install(str(tmp_path), branch="-x")
    with pytest.raises(ExtensionError, match="git clone failed"):
        host.install(str(tmp_path / "no-such-repo"))
    assert not any((tmp_path / "extensions").glob(".installing-*"))


def test_changes_are_refused_when_exposed_but_enable_still_works(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repos" / "stamp", stamp_extension("v1"))
    make_host(tmp_path / "data").install(str(repo))
    host = make_host(tmp_path / "data", changes_allowed=False)
    for action in (lambda: host.install(str(repo)), lambda: host.update("stamp"), lambda: host.remove("stamp")):
        with pytest.raises(ExtensionAccessError, match="--enable-insecure-extension-access"):
            action()
    host.enable("stamp")
    assert status_of(host, "stamp") == STATUS_ENABLED


def test_broken_extensions_are_marked_failed_and_the_rest_loads(tmp_path: Path) -> None:
    user = tmp_path / "extensions"
    make_repo(user / "broken_import", BROKEN_IMPORT)
    make_repo(user / "bad_manifest", BAD_MANIFEST)
    make_repo(user / "stamp", stamp_extension("v1"))
    (tmp_path / "extensions.json").write_text(json.dumps({"enabled": ["broken_import", "bad_manifest", "stamp"]}))
    host = make_host(tmp_path)
    broken = host.get("broken_import")
    assert broken.status == STATUS_FAILED and "ModuleNotFoundError" in broken.error
    assert "a_module_that_does_not_exist_anywhere" in broken.traceback
    bad = host.get("bad_manifest")
    assert bad.status == STATUS_FAILED and "name must be letters" in bad.error
    with pytest.raises(ExtensionError, match="bad manifest"):
        host.enable("bad_manifest")
    assert status_of(host, "stamp") == STATUS_ENABLED


def test_safe_mode_loads_nothing(tmp_path: Path) -> None:
    make_repo(tmp_path / "extensions" / "stamp", stamp_extension("v1"))
    (tmp_path / "extensions.json").write_text(json.dumps({"enabled": ["stamp"]}))
    host = make_host(tmp_path, safe_mode=True)
    assert status_of(host, "stamp") == STATUS_SAFE_MODE
    assert not (tmp_path / "extensions" / "stamp" / "imported.marker").exists()
    assert host.sections() == []


def test_requirements_need_consent_and_never_replace_torch(tmp_path: Path) -> None:
    user = tmp_path / "extensions"
    make_repo(user / "wants_torch", {"extension.toml": manifest("wants_torch", requires=("torch<1",)),
                                      "__init__.py": "def setup(api): pass\n"})
    make_repo(user / "wants_missing", {"extension.toml": manifest("wants_missing", requires=("zz-not-installed-pkg",)),
                                        "__init__.py": "def setup(api): pass\n"})
    make_repo(user / "wants_pillow", {"extension.toml": manifest("wants_pillow", requires=("pillow>=8",)),
                                       "__init__.py": "def setup(api): pass\n"})
    host = make_host(tmp_path)
    with pytest.raises(ExtensionError, match="refused: torch .* may not replace torch, diffusers, transformers"):
        host.enable("wants_torch", install_requirements=True)
    with pytest.raises(ExtensionError, match="needs zz-not-installed-pkg.*Allow installing"):
        host.enable("wants_missing")
    assert not host.get("wants_missing").enabled
    assert "Enabled wants_pillow" in host.enable("wants_pillow")


# -- values ----------------------------------------------------------------------------------------------------------


def test_alwayson_args_map_by_order_or_name_and_errors_name_the_field(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    host.enable("cfg_rescale")
    assert host.values_from_alwayson({"CFG Rescale": {"args": [0.7]}}) == (("cfg_rescale", "multiplier", 0.7),)
    assert host.values_from_alwayson({"cfg_rescale": {"args": {"multiplier": 0.25}}}) == (
        ("cfg_rescale", "multiplier", 0.25),)
    with pytest.raises(ParamError) as error:
        host.values_from_alwayson({"ADetailer": {"args": [True]}})
    assert error.value.field == "alwayson_scripts"
    # A1111 sends titles lower-cased.
    assert host.values_from_alwayson({"cfg rescale": {"args": [0.5]}}) == (("cfg_rescale", "multiplier", 0.5),)
    with pytest.raises(ParamError) as error:
        host.values_from_alwayson({"CFG Rescale": {"args": [3]}})
    assert (error.value.field, error.value.reason) == ("extensions.cfg_rescale.multiplier",
                                                       "must be between 0 and 1, got 3")
    with pytest.raises(ParamError, match="takes at most 1 values"):
        host.values_from_alwayson({"CFG Rescale": {"args": [0.1, 0.2]}})
    assert host.script_info()[0]["name"] == "cfg rescale"


def test_params_carry_extension_values_immutably() -> None:
    params = GenerationParams().with_extension_values("b", {"x": 1}).with_extension_values("a", {"y": True})
    assert params.extensions == (("a", "y", True), ("b", "x", 1))
    assert params.extension_values("b") == {"x": 1}
    hash(params)
    with pytest.raises(ParamError) as error:
        GenerationParams(extensions=(("a", "k", float("nan")),)).validated()
    assert error.value.field == "extensions.a.k"


# -- the shipped extensions ------------------------------------------------------------------------------------------


def test_wildcards_are_reproducible_from_the_seed_and_pasting_restores_the_template(tmp_path: Path) -> None:
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "place.txt").write_text("forest\ndesert\ncity\nbeach\nmountain\n")
    host = make_host(tmp_path)
    host.enable("wildcards")
    template = "a __color__ __animal__ in the __place__, __unknown__"

    def expanded(seed: int) -> BeforeGenerationContext:
        context = BeforeGenerationContext(GenerationParams(prompt=template), seed)
        host.run(HookPoint.BEFORE_GENERATION, context)
        return context

    first, again = expanded(42), expanded(42)
    assert first.params.prompt == again.params.prompt
    assert "__" not in first.params.prompt.replace("__unknown__", "")
    assert first.params.prompt.endswith(", __unknown__")  # unknown names stay as written
    assert first.infotext_fields == {"Template": template}
    assert len({expanded(seed).params.prompt for seed in range(30)}) > 5
    # The seed decides through a private random.Random: the global generator is never touched.
    random.seed(1)
    state = random.getstate()
    expanded(7)
    assert random.getstate() == state
    pasted = host.pasted(first.params.prompt, "", {"Template": template, "Seed": "42"})
    assert isinstance(pasted, InfotextPastedContext) and pasted.prompt == template


def test_cfg_rescale_matches_the_conditional_spread() -> None:
    import importlib.util

    import torch

    path = SHIPPED_EXTENSIONS / "cfg_rescale" / "__init__.py"
    spec = importlib.util.spec_from_file_location("cfg_rescale_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 4, 8, 8, generator=generator)
    guided = 5 * torch.randn(2, 4, 8, 8, generator=generator)
    full = module.rescaled_guidance(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-4)
    assert torch.equal(module.rescaled_guidance(guided, cond, 0.0), guided)


# -- through the real engine -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path):  # noqa: ANN201 - LoadedModel
    return load_on_cpu(tiny_model_dir, "tiny")


def generate_one(model, params: GenerationParams, host: ExtensionHost | None):  # noqa: ANN001, ANN201
    from webui.engine.generate import generate

    batches = list(generate(model, params, 1234, "test", hooks=host))
    return batches[0][0]


def test_a_raising_hook_fails_its_extension_not_the_job(tmp_path: Path, tiny_model) -> None:  # noqa: ANN001
    make_repo(tmp_path / "extensions" / "raising_hook", RAISING_HOOK)
    (tmp_path / "extensions.json").write_text(json.dumps({"enabled": ["raising_hook", "cfg_rescale"]}))
    host = make_host(tmp_path)
    params = GenerationParams(prompt="a lighthouse", steps=3, width=64, height=64, seed=1234)
    plain = generate_one(tiny_model, params, None)
    with_hooks = generate_one(tiny_model, params, host)
    # The failing CFG hook was dropped after its first call and the job finished with the same picture.
    assert np.array_equal(np.asarray(plain.image), np.asarray(with_hooks.image))
    failed = host.get("raising_hook")
    assert failed.status == STATUS_FAILED and "CFG hook raised RuntimeError: this hook always fails" in failed.error
    assert "explode" in failed.traceback
    assert status_of(host, "cfg_rescale") == STATUS_ENABLED

    rescaled = generate_one(tiny_model, params.with_extension_values("cfg_rescale", {"multiplier": 0.7}), host)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(rescaled.image))
    fields = parse_infotext(rescaled.infotext).fields
    assert fields["CFG Rescale"] == "0.7"
    assert list(fields).index("CFG Rescale") < list(fields).index("Version")
    assert host.values_from_infotext(fields)["cfg_rescale"] == {"multiplier": 0.7}
    assert "CFG Rescale" not in parse_infotext(plain.infotext).fields


def test_wildcards_through_the_engine_write_the_template(tmp_path: Path, tiny_model) -> None:  # noqa: ANN001
    host = make_host(tmp_path)
    host.enable("wildcards")
    image = generate_one(tiny_model, GenerationParams(prompt="a __color__ cube", steps=2, width=64, height=64), host)
    parsed = parse_infotext(image.infotext)
    assert parsed.fields["Template"] == "a __color__ cube"
    color = parsed.prompt.removeprefix("a ").removesuffix(" cube")
    assert color in (SHIPPED_EXTENSIONS / "wildcards" / "wildcards" / "color.txt").read_text().split()


def test_flags_decide_safe_mode_and_whether_changes_are_allowed(tmp_path: Path) -> None:
    from webui.cli import build_parser
    from webui.main import build_extension_host

    def host_for(*flags: str) -> ExtensionHost:
        return build_extension_host(build_parser(tmp_path).parse_args(["--data-dir", str(tmp_path), *flags]))

    assert host_for().changes_allowed and not host_for().safe_mode
    assert not host_for("--listen").changes_allowed
    assert host_for("--listen", "--enable-insecure-extension-access").changes_allowed
    assert host_for("--disable-extensions").safe_mode
    assert host_for("--extensions-dir", str(tmp_path / "elsewhere")).user_dir == tmp_path / "elsewhere"
    assert host_for().user_dir == tmp_path / "extensions"
