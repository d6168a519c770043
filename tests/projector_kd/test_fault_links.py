"""Links in an ImageFolder tree: links to files and linked class folders are read as torchvision reads them; a link
to a folder below a class folder (which torchvision follows, into loops or other classes) is refused, naming it, by
the layout check and by the dataset's own walk."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder
from tracks import write_class_tree

from projector_kd.engine.data import CheckedImageFolder, DataError, check_image_folder


def test_links_to_files_nested_folders_and_linked_class_folders_read_as_torchvision_reads_them(tmp_path):
    elsewhere = write_class_tree(tmp_path / "elsewhere", classes=("c",))
    root = write_class_tree(tmp_path / "data")
    (root / "train" / "a" / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "train" / "a" / "nested" / "deeper" / "x.png")
    os.symlink(elsewhere / "train" / "c" / "0.png", root / "train" / "a" / "linked.png")  # a link to a file
    os.symlink(root / "train" / "b" / "0.png", root / "train" / "a" / "from-b.png")  # even to another class's file
    for split in ("train", "val"):
        os.symlink(elsewhere / split / "c", root / split / "c")  # a linked class folder
    check_image_folder(root)
    ours = CheckedImageFolder(root / "train")
    assert ours.samples == ImageFolder(str(root / "train")).samples
    assert [os.path.relpath(path, root / "train") for path, _ in ours.samples[:5]] == [
        "a/0.png",
        "a/1.png",
        "a/from-b.png",
        "a/linked.png",
        "a/nested/deeper/x.png",
    ]


@pytest.mark.parametrize("target", ["..", "../..", "../../b"])
def test_a_link_to_a_folder_below_a_class_folder_is_refused_by_the_check_and_the_dataset(tmp_path, target):
    root = write_class_tree(tmp_path / "data")
    (root / "train" / "a" / "sub").mkdir()
    link = root / "train" / "a" / "sub" / "up"
    os.symlink(target, link)
    expected = (
        f"class folder {root / 'train' / 'a'} holds {link}, a link to the folder {target}: links to folders below a "
        "class folder are refused (one that loops back or leads to another class would add images again and again, "
        "or under the wrong label) — remove it, or link the image files or the whole class folder instead"
    )
    for policy in ("fail", "skip"):
        with pytest.raises(DataError) as error:
            check_image_folder(root, on_bad_image=policy)
        assert str(error.value) == expected
    with pytest.raises(DataError) as error:
        CheckedImageFolder(root / "train")
    assert str(error.value) == expected
    assert len(ImageFolder(str(root / "train")).samples) > 4  # what torchvision alone would read: more than the 4
