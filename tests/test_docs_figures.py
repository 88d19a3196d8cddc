"""Docs figures cannot drift: every generated number in README.md and docs/*.md, and every
benchmark image copied into docs/assets, equals what benchmarks/render_docs.py renders from
the committed results files. Fix a failure with ``python benchmarks/render_docs.py``."""

import difflib
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
render_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_docs)


def _history_available() -> bool:
    commits = []
    for name in render_docs.RESULTS:
        data = json.loads((render_docs.BENCH / name).read_text())
        commits.append(data["provenance"]["commit"])
        commits += [r["commit"] for r in data.get("runs", []) if "commit" in r]
    try:
        return all(render_docs.has_history(c) for c in set(commits))
    except OSError:
        return False


needs_history = pytest.mark.skipif(
    not _history_available(), reason="provenance notes need the git history of the results"
)


@needs_history
@pytest.mark.parametrize("page", render_docs.PAGES)
def test_page_matches_results(page):
    text = (ROOT / page).read_text()
    rendered = render_docs.render_text(text)
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(True), rendered.splitlines(True), page, "rendered from results"
        )
    )
    assert rendered == text, f"run python benchmarks/render_docs.py\n{diff}"


def test_assets_are_copies_of_benchmark_plots():
    assert render_docs.check_assets(write=False) == []


@pytest.mark.parametrize("name", sorted(render_docs.RESULTS))
def test_results_record_provenance(name):
    data = json.loads((render_docs.BENCH / name).read_text())
    info = data["provenance"]
    assert len(info["commit"]) == 40
    assert info["commit_source"]
    assert {"python", "torch"} <= set(info["versions"])
    assert info["machine"]
    for run in data.get("runs", []):
        assert len(run.get("commit", info["commit"])) == 40


def test_generated_regions_exist():
    """The pages that quote benchmarks use generated regions (not typed numbers)."""
    for page in ("README.md", "docs/performance.md", "docs/choosing.md", "docs/rl.md"):
        assert "<!-- fig: " in (ROOT / page).read_text(), page
    assert "<!-- fig: " in (ROOT / "docs/supervised.md").read_text()


def test_renderer_rejects_a_region_in_a_code_span():
    with pytest.raises(RuntimeError, match="code span"):
        render_docs.render_text("`x <!-- fig: 1 -->1<!-- /fig -->`")


def test_renderer_rejects_chained_subscripts():
    """``x['a']['b']`` in a region is an autorefs reference link: mkdocs --strict fails."""
    with pytest.raises(RuntimeError, match="reference link"):
        render_docs.render_text("n = <!-- fig: {'a': {'b': 1}}['a']['b'] -->1<!-- /fig -->")


def test_check_mode_reports_a_drifted_number(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("t <!-- fig: ms(vanilla('cpu', 'mlp')) -->0.0 ms<!-- /fig -->\n")
    monkeypatch.setattr(render_docs, "ROOT", tmp_path)
    monkeypatch.setattr(render_docs, "PAGES", ["page.md"])
    monkeypatch.setattr(render_docs, "ASSETS", {})
    assert render_docs.main(["--check"]) == 1
    assert render_docs.main([]) == 0
    assert "3.1 ms" in page.read_text()


def test_git_is_optional_for_the_numbers(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    assert render_docs.git("status") is None
    assert render_docs.render_text("n <!-- fig: num(1234) -->x<!-- /fig -->").endswith(
        "1,234<!-- /fig -->"
    )


def test_first_change_sees_net_changes_only(tmp_path, monkeypatch):
    """A measured file changed and changed back is unchanged; a net change names its first
    commit; an edit not committed yet is 'uncommitted'."""

    def run(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def commit(text: str, message: str) -> str:
        (tmp_path / "code.py").write_text(text)
        run("add", "code.py")
        run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
        return run("rev-parse", "--short", "HEAD")

    run("init", "-q")
    measured = commit("x = 1\n", "measured")
    monkeypatch.setattr(render_docs, "ROOT", tmp_path)
    assert render_docs.first_change(measured, ["code.py"]) is None
    changed = commit("x = 2\n", "change")
    assert render_docs.first_change(measured, ["code.py"]) == changed
    commit("x = 1\n", "undo")
    assert render_docs.first_change(measured, ["code.py"]) is None
    (tmp_path / "code.py").write_text("x = 3\n")
    assert render_docs.first_change(measured, ["code.py"]) == changed
    run("checkout", "-q", "code.py")
    latest = run("rev-parse", "--short", "HEAD")
    (tmp_path / "code.py").write_text("x = 4\n")
    assert render_docs.first_change(latest, ["code.py"]) == "uncommitted"


def _tracked_files() -> list[str] | None:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "benchmarks"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return [name for name in listed.stdout.split("\0") if name]


@needs_history
def test_pages_render_from_committed_files_only(tmp_path, monkeypatch):
    """A clean clone lacks ignored files (run folders, caches): every figure must render
    from what git tracks, or CI fails where the working tree passes."""
    tracked = _tracked_files()
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        source = ROOT / name
        if source.is_file():
            target = tmp_path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    monkeypatch.setattr(render_docs, "BENCH", tmp_path / "benchmarks")
    render_docs.load.cache_clear()
    try:
        for page in render_docs.PAGES:
            text = (ROOT / page).read_text()
            assert render_docs.render_text(text) == text, page
    finally:
        render_docs.load.cache_clear()


def test_tuning_table_compares_on_the_same_seeds(tmp_path, monkeypatch):
    def run(algo, seed, final):
        return {"env": "E-v0", "algo": algo, "seed": seed, "steps": 300_000, "final_return": final}

    runs = [run("base", 1000, 100.0), run("base", 1001, 300.0), run("base", 1002, 999.0)]
    runs += [run("new", 1000, 150.0), run("new", 1001, 450.0)]
    folder = tmp_path / "benchmarks" / "rl" / "fake"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"runs": runs}))
    monkeypatch.setattr(render_docs, "BENCH", tmp_path / "benchmarks")
    render_docs.load.cache_clear()
    table = render_docs.tuning_table("fake", [("E-v0", "new")], reference="base")
    # mean 300 over seeds 1000-1001, against the reference's 200 on those seeds (not 466)
    assert "| E-v0 | `new` | 1000-1001 | 150 / 450 | 300 | 1.50 |" in table
    runs.append(run("new", 1005, 1.0))  # a seed the reference lacks: an error, not a ratio
    (folder / "results.json").write_text(json.dumps({"runs": runs}))
    render_docs.load.cache_clear()
    with pytest.raises(KeyError, match="lacks seeds"):
        render_docs.tuning_table("fake", [("E-v0", "new")], reference="base")
    render_docs.load.cache_clear()  # later tests read the real files


def test_goal_table_takes_the_best_rat_row_and_says_what_is_missing(tmp_path, monkeypatch):
    def row(env, algo, iqm, iqr):
        figure = {"estimate": iqm, "low": iqm - 10, "high": iqm + 10}
        return {"env": env, "algo": algo, "final_return": figure, "iqr_final_return": iqr}

    rows = [row("A-v0", "rat-npg", 100.0, 5.0), row("A-v0", "rat-trpo", 120.0, 7.0),
            row("A-v0", "sb3-trpo", 110.0, 9.0), row("A-v0", "cg-trpo", 90.0, 9.0),
            row("A-v0", "kfac", 80.0, 9.0),
            row("B-v0", "rat-npg", 100.0, 5.0), row("B-v0", "sb3-trpo", 130.0, 9.0),
            row("C-v0", "rat-npg", 100.0, 5.0), row("C-v0", "sb3-trpo", 90.0, 9.0)]  # fmt: skip
    earlier = [{"env": "A-v0", "algo": "rat-npg", "final_return": f} for f in (10.0, 20.0, 40.0)]
    folder = tmp_path / "benchmarks" / "rl"
    folder.mkdir(parents=True)
    (folder / "protocol.json").write_text(
        json.dumps({"envs": ["A-v0", "B-v0", "C-v0"], "rows": rows})
    )
    (folder / "today.json").write_text(json.dumps({"runs": earlier}))
    monkeypatch.setattr(render_docs, "BENCH", tmp_path / "benchmarks")
    render_docs.load.cache_clear()
    table = render_docs.protocol_goal_table("rl/protocol.json", today="rl/today.json")
    render_docs.load.cache_clear()  # later tests read the real files
    lines = table.strip().splitlines()
    # A: rat-trpo is the best RAT row and beats every rival; today's IQR of 10, 20, 40 is 15
    assert lines[2] == ("| A-v0 | `rat-trpo` 120 [110, 130] | 110 [100, 120] | 90 [80, 100] | "
                        "80 [70, 90] | 7 / 15 | met |")  # fmt: skip
    assert lines[3].endswith("| not run | not run | 5 / n/a | missed |")  # the peer is ahead
    assert lines[4].endswith("| not run | not run | 5 / n/a | open |")  # ahead, rows missing
    # the rivals of C evaluated later, in a protocol of their own: C's row pools both
    later = [row("C-v0", "cg-trpo", 95.0, 9.0), row("C-v0", "kfac", 99.0, 9.0)]
    (folder / "later.json").write_text(json.dumps({"envs": ["C-v0"], "rows": later}))
    table = render_docs.protocol_goal_table(
        "rl/protocol.json", "rl/later.json", today="rl/today.json"
    )
    render_docs.load.cache_clear()
    assert table.strip().splitlines()[4].endswith("| 95 [85, 105] | 99 [89, 109] | 5 / n/a | met |")


def test_goal_table_spread_is_the_protocols_iqr():
    """render_docs keeps to the standard library; its IQR must be protocol.py's (numpy's)."""
    from bench import load_benchmark

    protocol = load_benchmark("rl/protocol.py")
    for values in ([1.0, 2.0], [788.0, 3721.0, 3248.0], [5.0, -1.0, 2.5, 9.0, 3.0, 3.0, 0.5]):
        assert render_docs._spread(values) == pytest.approx(protocol.iqr_spread(values))
