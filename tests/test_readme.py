"""The README's quick start runs as written (the front door must stay true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs_and_reports_stats(capsys):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.hidden_states.shape == (4, 32, 64)
    assert out.stats["tokens_per_expert"].sum().item() == 4 * 32 * 2
    assert "tensor(" in capsys.readouterr().out


def test_readme_install_and_test_commands_are_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    install = re.search(r"## Install\n\n```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    test = re.search(r"## Test\n\n```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    for line in install + test:
        assert line.strip() in ci_lines, line


def test_every_test_the_guarantees_section_names_exists():
    section = README.read_text().split("## What moekit guarantees", 1)[1].split("\n## ", 1)[0]
    tests = Path(__file__).resolve().parent
    current, named = None, []
    for file, name in re.findall(r"`(test_\w+\.py)?(?:::(test_\w+))?`", section):
        current = file or current
        if file and not name:
            assert (tests / file).is_file(), file
        if name:
            named.append((current, name))
    assert len(named) >= 20
    for file, name in named:
        assert re.search(rf"^def {name}\(", (tests / file).read_text(), re.M), f"{file}::{name}"
