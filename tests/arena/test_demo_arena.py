from rich.console import Console

from headwise.demo import ARENA, _demo_arena


def test_demo_arena_section(tmp_path):
    text = _demo_arena(tmp_path / "arena", Console(quiet=True), 0.003, progress=False)
    assert "## Quick arena run" in text
    for task in ARENA["tasks"]:
        assert f"## {task}: " in text and (tmp_path / "arena" / "plots" / f"{task}_metric.png").exists()
    for variant in ARENA["variants"]:
        assert f"| {variant} |" in text
