"""The recipes shipped with pytest-nsbox resolve by name in any project, after the project's own."""

from __future__ import annotations

from pathlib import Path

from pytest_nsbox.images import recipes

SHIPPED = ("busybox", "debian-bookworm", "debian-bookworm-curl", "debian-bookworm-redis")
REPO_IMAGES = Path(__file__).resolve().parents[2] / "rootfs_images"


def test_shipped_names_resolve_in_a_project_without_rootfs_images(tmp_path: Path) -> None:
    dirs = recipes.search_dirs(tmp_path, [])
    assert recipes.known_images(dirs) == list(SHIPPED)
    for name in SHIPPED:
        recipe = recipes.find(name, dirs)
        assert recipe is not None, f"{name} not found in {dirs}"
        assert recipe.path == recipes.shipped_dir() / name / recipes.RECIPE_FILE
    curl = recipes.find("debian-bookworm-curl", dirs)
    assert curl is not None and curl.base == ("recipe", "debian-bookworm")  # its base resolves from the same dirs


def test_a_projects_own_recipe_of_the_same_name_wins(tmp_path: Path) -> None:
    extra = tmp_path / "more_images" / "debian-bookworm"
    extra.mkdir(parents=True)
    (extra / recipes.RECIPE_FILE).write_text("[base]\nscratch = true\n")
    own = tmp_path / "rootfs_images" / "busybox"
    own.mkdir(parents=True)
    (own / recipes.RECIPE_FILE).write_text("[base]\nscratch = true\n")
    dirs = recipes.search_dirs(tmp_path, ["more_images"])
    assert recipes.find("busybox", dirs) == recipes.parse(own / recipes.RECIPE_FILE)
    assert recipes.find("debian-bookworm", dirs) == recipes.parse(extra / recipes.RECIPE_FILE)
    assert recipes.known_images(dirs) == [
        "debian-bookworm",
        "busybox",
        "debian-bookworm-curl",
        "debian-bookworm-redis",
    ]  # search order, once each


def test_the_shipped_recipes_are_the_repositorys(tmp_path: Path) -> None:
    # From a source checkout (an editable install) the shipped folder is the top-level rootfs_images/,
    # listed once when the project is pytest-nsbox itself.
    assert recipes.shipped_dir().samefile(REPO_IMAGES)
    assert recipes.search_dirs(REPO_IMAGES.parent, []) == [REPO_IMAGES]
