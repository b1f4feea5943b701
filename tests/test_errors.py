"""One base exception (issue 13, item 3): every error the project raises on purpose derives from
``DeepclickError``, which the CLI catches once."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from typer.testing import CliRunner

from deepclick.errors import DeepclickError
from deepclick_cli.main import app

PACKAGES = ("deepclick", "models", "candidates", "pipelines", "serving", "lifecycle")


def _project_exceptions() -> list[type[BaseException]]:
    found = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules = [package] + [
            importlib.import_module(info.name)
            for info in pkgutil.walk_packages(package.__path__, f"{name}.")
        ]
        for module in modules:
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                    found.append(cls)
    return found


def test_every_project_exception_derives_from_deepclick_error() -> None:
    found = _project_exceptions()
    assert len(found) >= 30  # the 31 classes of issue 13, and any added since
    assert [c.__qualname__ for c in found if not issubclass(c, DeepclickError)] == []


def test_the_cli_prints_a_deepclick_error_and_exits_1(tmp_path) -> None:
    """A spec that does not exist raises SpecError inside the command; the CLI's one handler
    prints its message (which names the spec and the built-in ones) instead of a traceback."""
    result = CliRunner().invoke(app, ["specs", str(tmp_path / "nowhere.yaml")])
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "nowhere" in result.output
    assert "Traceback" not in result.output


def test_the_cli_prints_an_os_error_instead_of_a_traceback(tmp_path) -> None:
    """Regression: an output folder under a regular file (NotADirectoryError, an OSError from the
    machine, not a bug) printed a Python traceback; it must be one ``error:`` line and exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner(env={"DEEPCLICK_ROOT": str(tmp_path / "var")}).invoke(
        app,
        ["simulate", "--out", str(blocker / "raw"), "--days", "1", "--impressions-per-day", "50"],
    )
    assert result.exit_code == 1
    assert "error: [Errno 20] Not a directory" in result.output and "a-file" in result.output
    assert "Traceback" not in result.output
