"""The README documents what the code does: its config table is the config's own."""

from pathlib import Path

from pipeline.config import keys_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_table_matches_the_config():
    readme = (ROOT / "README.md").read_text()
    assert keys_table() in readme, "regenerate the README's config table with keys_table()"


def test_makefile_has_every_target_the_readme_names():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("help", "setup", "run", "test", "test-slow", "test-gpu", "bench", "lint"):
        assert f"\n{target}:" in makefile, target


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
