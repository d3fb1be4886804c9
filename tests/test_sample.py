from PIL import Image

from skinray.data.sample import DERMNET_CLASSES, write_sample


def test_dermnet_names_are_kaggles():
    assert len(DERMNET_CLASSES) == 23
    assert "Acne and Rosacea Photos" in DERMNET_CLASSES
    assert "Melanoma Skin Cancer Nevi and Moles" in DERMNET_CLASSES


def test_layout_sizes_formats(sample_archive):
    train = sorted((sample_archive / "train").iterdir())
    assert [p.name for p in train] == list(DERMNET_CLASSES[:4])
    files = sorted(p for p in sample_archive.rglob("*") if p.is_file() and p.name != "metadata.csv")
    assert len(files) == 4 * (24 + 6)
    metadata = (sample_archive / "metadata.csv").read_text().splitlines()
    assert metadata[0] == "path,skin_tone" and len(metadata) == 1 + len(files)
    tones = {line.rsplit(",", 1)[1] for line in metadata[1:]}
    listed = {line.rsplit(",", 1)[0].strip('"') for line in metadata[1:]}
    assert tones == {"1", "2", "3", "4"} and listed == {
        p.relative_to(sample_archive).as_posix() for p in files
    }
    suffixes = {p.suffix for p in files}
    assert suffixes == {".jpg", ".png"}
    sizes = [Image.open(p).size for p in files[:40]]
    assert all(480 <= w <= 1024 and 480 <= h <= 1024 for w, h in sizes)
    assert len({round(w / h, 1) for w, h in sizes}) > 5  # varied aspect ratios


def test_same_seed_same_bytes(tmp_path):
    a = write_sample(tmp_path / "a", per_class=2, classes=2, seed=5)
    write_sample(tmp_path / "b", per_class=2, classes=2, seed=5)
    write_sample(tmp_path / "c", per_class=2, classes=2, seed=6)
    assert a == {"train": 4, "test": 2}
    for path in (tmp_path / "a").rglob("*.*"):
        rel = path.relative_to(tmp_path / "a")
        assert path.read_bytes() == (tmp_path / "b" / rel).read_bytes()
        assert path.read_bytes() != (tmp_path / "c" / rel).read_bytes()
