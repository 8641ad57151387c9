"""An image's config: parsing Env, WorkingDir and User as hostile input, resolving the User in the
image's own layers (overlay rules, no symlink out of them), and the environments built from it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pytest_nsbox.images.config import (
    DEFAULT_PATH,
    ImageConfig,
    ImageConfigError,
    ImageUser,
    environment_for_tests,
    parse_image_config,
    read_image_file,
    resolve_user,
    run_environment,
)
from pytest_nsbox.images.errors import ImageImportError

IMAGE = "oci:img"
PASSWD = "root:x:0:0:root:/root:/bin/sh\n# a comment\nbroken line\napp:x:1000:1001:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1001:\nwheel:x:10:app,other\nstaff:x:50:other\n"


def test_a_full_config() -> None:
    env = ["PATH=/opt/bin:/bin", "FOO=a=b", "EMPTY=", "FOO=again"]
    document = {"config": {"Env": env, "WorkingDir": "/srv//app/", "User": "app"}}
    config = parse_image_config(document, IMAGE)
    assert config.environ() == {"PATH": "/opt/bin:/bin", "FOO": "again", "EMPTY": ""}
    assert config.workdir == "/srv/app" and config.user == "app"


@pytest.mark.parametrize(
    "document",
    [{}, {"config": None}, {"config": {}}, {"config": {"Env": None, "WorkingDir": "", "User": ""}}, {"config": {"Cmd": ["x"]}}],
)
def test_what_is_not_set(document: dict[str, object]) -> None:
    assert parse_image_config(document, IMAGE) == ImageConfig()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "image 'oci:img': its config is not a JSON object"),
        ({"config": []}, "image 'oci:img': config field config must be an object"),
        ({"config": {"Env": "PATH=/bin"}}, "image 'oci:img': config field Env must be a list of *, not 'PATH=/bin'"),
        ({"config": {"Env": ["A", "B"]}}, "config field Env must be a list of \"KEY=VALUE\" strings; item 0 is 'A'"),
        ({"config": {"Env": ["A=1", "NOEQUALS"]}}, "config field Env * item 1 is 'NOEQUALS'"),
        ({"config": {"Env": ["=value"]}}, "config field Env * item 0 is '=value'"),
        ({"config": {"Env": [3]}}, "config field Env * item 0 is 3"),
        ({"config": {"Env": ["A=\0"]}}, "config field Env * item 0 is"),
        ({"config": {"WorkingDir": "srv/app"}}, "config field WorkingDir must be an absolute path, not 'srv/app'"),
        ({"config": {"WorkingDir": 7}}, "config field WorkingDir must be an absolute path, not 7"),
        ({"config": {"User": "a b"}}, "config field User must be 'uid[:gid]' or 'name[:group]', not 'a b'"),
        ({"config": {"User": "app:"}}, "config field User must be *, not 'app:'"),
        ({"config": {"User": "1:2:3"}}, "config field User must be *, not '1:2:3'"),
        ({"config": {"User": "99999999999"}}, "config field User must be *, not '99999999999'"),
        ({"config": {"User": 1000}}, "config field User must be *, not 1000"),
        ({"config": {"User": "../x"}}, "config field User must be *, not '../x'"),
    ],
)
def test_a_bad_config_names_the_image_and_the_field(document: object, message: str) -> None:
    with pytest.raises(ImageImportError) as raised:
        parse_image_config(document, IMAGE)
    assert isinstance(raised.value, ImageConfigError)
    pattern = ".*".join(re.escape(part) for part in message.split("*"))
    assert re.search(pattern, str(raised.value)), str(raised.value)


@pytest.mark.parametrize("user", ["0", "1000", "1000:1000", "app", "app:wheel", "1000:wheel", "app:10", "_apt", "nobody$"])
def test_user_forms(user: str) -> None:
    assert parse_image_config({"config": {"User": user}}, IMAGE).user == user


def test_recipe_steps_make_the_same_config() -> None:
    config = ImageConfig(env=(("PATH", "/bin"),), workdir="/srv")
    config = config.with_env({"FOO": "1", "PATH": "/opt/bin:/bin"}).with_workdir("app").with_workdir("../data")
    assert config.environ() == {"PATH": "/opt/bin:/bin", "FOO": "1"}
    assert config.workdir == "/srv/data"
    assert ImageConfig().with_workdir("rel").workdir == "/rel"


# --- the user in the image's layers --------------------------------------------------------------


def _layer(root: Path, files: dict[str, str]) -> str:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def _resolve(user: str, layers: list[str]) -> ImageUser | None:
    return resolve_user(ImageConfig(user=user), layers, IMAGE)


def test_names_resolve_in_the_images_passwd_and_group(tmp_path: Path) -> None:
    layers = [_layer(tmp_path / "l0", {"etc/passwd": PASSWD, "etc/group": GROUP})]
    assert _resolve("app", layers) == ImageUser("app", 1000, 1001, (10,), "/home/app")
    assert _resolve("app:wheel", layers) == ImageUser("app:wheel", 1000, 10, (), "/home/app")
    assert _resolve("1000", layers) == ImageUser("1000", 1000, 1001, (10,), "/home/app")  # uid found: its gid
    assert _resolve("4242", layers) == ImageUser("4242", 4242, 0, (), "/")  # as docker: gid 0, home /
    assert _resolve("4242:staff", layers) == ImageUser("4242:staff", 4242, 50, (), "/")
    assert _resolve("root", layers) == ImageUser("root", 0, 0, (), "/root")
    assert _resolve("", layers) is None


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("ghost", "image 'oci:img': config field User 'ghost': no user 'ghost' in the image's /etc/passwd"),
        ("app:ghosts", "image 'oci:img': config field User 'app:ghosts': no group 'ghosts' in the image's /etc/group"),
    ],
)
def test_a_name_missing_from_the_image_is_an_error(tmp_path: Path, user: str, message: str) -> None:
    layers = [_layer(tmp_path / "l0", {"etc/passwd": PASSWD, "etc/group": GROUP})]
    with pytest.raises(ImageConfigError, match=f"^{message}$"):
        _resolve(user, layers)


def test_an_image_without_passwd_knows_no_names_but_takes_ids(tmp_path: Path) -> None:
    layers = [_layer(tmp_path / "l0", {"bin/x": ""})]
    with pytest.raises(ImageConfigError, match="no user 'app'"):
        _resolve("app", layers)
    assert _resolve("1000:1000", layers) == ImageUser("1000:1000", 1000, 1000, (), "/")


def test_the_top_layer_wins(tmp_path: Path) -> None:
    lower = _layer(tmp_path / "lower", {"etc/passwd": "app:x:1:1::/old:/bin/sh\n"})
    upper = _layer(tmp_path / "upper", {"etc/passwd": "app:x:2:2::/new:/bin/sh\n"})
    assert _resolve("app", [upper, lower]) == ImageUser("app", 2, 2, (), "/new")
    assert _resolve("app", [_layer(tmp_path / "other", {"etc/motd": "hi"}), lower]) == ImageUser("app", 1, 1, (), "/old")


def _whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mknod(path, 0o600 | 0o020000, 0)  # S_IFCHR 0/0: an overlay whiteout
    except PermissionError:
        pytest.skip("creating a whiteout (a 0/0 character device) needs CAP_MKNOD")


def test_a_whiteout_or_an_opaque_directory_hides_the_lower_file(tmp_path: Path) -> None:
    lower = _layer(tmp_path / "lower", {"etc/passwd": PASSWD})
    upper = _layer(tmp_path / "upper", {})
    _whiteout(tmp_path / "upper" / "etc" / "passwd")
    assert read_image_file([upper, lower], "/etc/passwd") is None
    with pytest.raises(ImageConfigError, match="no user 'app'"):
        _resolve("app", [upper, lower])
    opaque = _layer(tmp_path / "opaque", {"etc/hostname": "x"})
    xattr = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"
    try:
        os.setxattr(tmp_path / "opaque" / "etc", xattr, b"y")
    except OSError as exc:
        pytest.skip(f"cannot set {xattr} here: {exc}")
    assert read_image_file([opaque, lower], "/etc/passwd") is None
    assert read_image_file([opaque, lower], "/etc/hostname") == b"x"


def test_symlinks_resolve_inside_the_image(tmp_path: Path) -> None:
    lower = _layer(tmp_path / "lower", {"data/passwd": PASSWD})
    upper = _layer(tmp_path / "upper", {})
    (tmp_path / "upper" / "etc").mkdir()
    os.symlink("/data/../data/./passwd", tmp_path / "upper" / "etc" / "passwd")  # absolute: from the image's root
    (tmp_path / "upper" / "up").symlink_to("../../../..")  # '..' stops at the image's root
    assert read_image_file([upper, lower], "/etc/passwd") == PASSWD.encode()
    assert read_image_file([upper, lower], "/up/data/passwd") == PASSWD.encode()
    assert _resolve("app", [upper, lower]) is not None


def test_no_symlink_leads_out_of_the_layers(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("app:x:1:1::/:/bin/sh\n")
    layer = _layer(tmp_path / "l0", {})
    (tmp_path / "l0" / "etc").symlink_to(outside)  # on the host it would lead out: in the image it does not
    assert read_image_file([layer], "/etc/passwd") is None
    (tmp_path / "l0" / "etc").unlink()
    (tmp_path / "l0" / "etc").mkdir()
    (tmp_path / "l0" / "etc" / "passwd").symlink_to(outside / "passwd")
    assert read_image_file([layer], "/etc/passwd") is None
    (tmp_path / "l0" / "etc" / "group").symlink_to("group")
    with pytest.raises(OSError, match="too many symlinks"):
        read_image_file([layer], "/etc/group")
    with pytest.raises(ImageConfigError, match=r"cannot read /etc/group of the image to resolve its User: .*too many symlinks"):
        _resolve("1:1", [layer])


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    layer = _layer(tmp_path / "l0", {})
    (tmp_path / "l0" / "etc").mkdir()
    os.mkfifo(tmp_path / "l0" / "etc" / "passwd")  # reading it would block
    assert read_image_file([layer], "/etc/passwd") is None
    assert read_image_file([layer], "/etc") is None
    assert read_image_file([layer], "/etc/passwd/x") is None


# --- the environments ------------------------------------------------------------------------------


def test_a_test_keeps_what_pytest_owns() -> None:
    config = ImageConfig(
        env=tuple(
            {
                "PATH": "/opt/bin:/bin",
                "FOO": "1",
                "PYTHONPATH": "/app",
                "PYTHONHOME": "/usr",
                "PYTEST_ADDOPTS": "-x",
                "COV_CORE_SOURCE": "x",
                "COVERAGE_PROCESS_START": "x",
                "PYTHONDONTWRITEBYTECODE": "1",
            }.items()
        )
    )
    assert environment_for_tests(config) == {"PATH": "/opt/bin:/bin", "FOO": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def test_a_process_run_in_the_image_gets_dockers_environment() -> None:
    assert run_environment(ImageConfig(), None) == {"PATH": DEFAULT_PATH, "HOME": "/root"}
    app = ImageUser("app", 1000, 1000, (), "/home/app")
    assert run_environment(ImageConfig(env=(("FOO", "1"),)), app) == {"PATH": DEFAULT_PATH, "HOME": "/home/app", "FOO": "1"}
    image = ImageConfig(env=(("PATH", "/opt/bin"), ("HOME", "/srv")))
    defaults = {"PATH": "/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    assert run_environment(image, app, defaults) == {"PATH": "/opt/bin", "HOME": "/srv", "LANG": "C.UTF-8"}
    assert run_environment(ImageConfig(), app, defaults)["HOME"] == "/home/app"


# --- a recipe's config ------------------------------------------------------------------------------


def test_a_recipe_makes_its_config_from_its_base_and_its_env_and_workdir_steps(tmp_path: Path) -> None:
    from pytest_nsbox.images import recipes

    for name, toml in {
        "base": "[base]\nscratch = true\n[[steps]]\nenv = { A = '1', B = '1' }\n[[steps]]\nworkdir = '/srv'\n",
        "top": "[base]\nrecipe = 'base'\n[[steps]]\nenv = { B = '2' }\n[[steps]]\nworkdir = 'app'\n",
    }.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / "image.toml").write_text(toml)
    builder = recipes.RecipeBuilder(tmp_path / "cache", [tmp_path / "images"], progress=lambda line: None)
    top = recipes.find("top", [tmp_path / "images"])
    assert top is not None
    layers, config = builder.build_with_config(top)
    assert len(layers) == 1
    assert config == ImageConfig(env=(("A", "1"), ("B", "2")), workdir="/srv/app")
    base = recipes.find("base", [tmp_path / "images"])
    assert base is not None and builder.build_with_config(base)[1] == ImageConfig(env=(("A", "1"), ("B", "1")), workdir="/srv")
