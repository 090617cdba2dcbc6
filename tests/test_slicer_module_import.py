"""RadRegion.py imports with minimal stand-in slicer/qt/ctk/vtk modules; RadRegionLib stays Slicer-free and 3.9-clean."""

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "slicer_module" / "RadRegion"
LIB_DIR = MODULE_DIR / "RadRegionLib"


class StandInNode:
    """What slicer.util.loadVolume returns, as far as RadRegion.py uses it."""

    def __init__(self, path, image):
        self.path, self.image, self.attributes = path, image, {}

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)


def load_volume_with_itk(path, properties=None):
    """Slicer reads volumes with ITK: so does the stand-in (RuntimeError when it cannot, as in Slicer)."""
    import itk

    try:
        return StandInNode(path, itk.imread(str(path)))
    except Exception as error:
        raise RuntimeError(f"Failed to load volume: {path} ({error})") from None


def standin_modules() -> dict:
    """Just enough of Slicer's Python API for RadRegion.py to import and for its Logic and Test to run."""
    slicer = types.ModuleType("slicer")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    import unittest

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    removed = []

    class Scene:
        def Clear(self, close=0):
            pass

        def IsNodePresent(self, node):
            return node not in removed

        def RemoveNode(self, node):
            removed.append(node)

    slicer.ScriptedLoadableModule = slm
    slicer.mrmlScene = Scene()
    slicer.app = types.SimpleNamespace(cachePath=None, layoutManager=lambda: None)
    slicer.util = types.SimpleNamespace(loadVolume=load_volume_with_itk, resetSliceViews=lambda: None)
    slicer.vtkMRMLLayoutNode = types.SimpleNamespace(SlicerLayoutOneUpRedSliceView=6)
    return {"slicer": slicer, "slicer.ScriptedLoadableModule": slm, "qt": types.ModuleType("qt"),
            "ctk": types.ModuleType("ctk"), "vtk": types.ModuleType("vtk")}


def import_radregion_module(monkeypatch):
    """Import RadRegion.py as Slicer would (its folder on sys.path), with the stand-ins in sys.modules."""
    for name, module in standin_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    for name in [n for n in sys.modules if n == "RadRegion" or n.startswith("RadRegionLib")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("RadRegion")


def test_radregion_module_imports_and_describes_itself(monkeypatch):
    module = import_radregion_module(monkeypatch)
    parent = types.SimpleNamespace()
    module.RadRegion(parent)
    assert parent.title == "RadRegion"
    assert "Enter" in parent.helpText and "Ctrl+Z" in parent.helpText
    for name in ("RadRegionWidget", "RadRegionLogic", "RadRegionTest"):
        assert hasattr(module, name), f"RadRegion.py defines no {name}"
    assert hasattr(module.RadRegionTest, "test_annotation_run")
    assert (MODULE_DIR / "Resources" / "UI" / "RadRegion.ui").is_file()
    assert (MODULE_DIR / "Resources" / "Icons" / "RadRegion.png").is_file()


def test_logic_says_in_words_when_the_server_is_unreachable(monkeypatch, tmp_path):
    module = import_radregion_module(monkeypatch)
    logic = module.RadRegionLogic()
    with pytest.raises(module.ServerError, match=r"cannot reach the RadRegion server at http://127\.0\.0\.1:9"):
        logic.connect("127.0.0.1:9", work_dir=str(tmp_path))
    assert logic.session.status_message.startswith("Not connected: cannot reach")
    assert logic.show_current_image() is None  # nothing loaded, nothing to show


def test_radregion_lib_imports_without_slicer_or_qt():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import RadRegionLib, RadRegionLib.panel; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('slicer', 'qt', 'ctk', 'vtk', 'PySide6', 'PyQt5', 'requests', 'numpy')); print(bad)")
    result = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"RadRegionLib pulled in {result.stdout.strip()}"


@pytest.mark.parametrize("path", sorted(LIB_DIR.glob("*.py")) + [MODULE_DIR / "RadRegion.py"], ids=lambda p: p.name)
def test_slicer_code_parses_as_python_3_9(path):
    """Slicer 5.x ships Python 3.9: no match statements, no parenthesised context managers."""
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_every_widget_the_module_uses_exists_in_the_ui_file():
    import re
    import xml.etree.ElementTree as ElementTree

    names = {w.get("name") for w in ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "RadRegion.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "RadRegion.py").read_text()))
    used |= set(re.findall(r'"(\w+(?:Button|Edit|Widget|Label|Bar|ComboBox))"', (MODULE_DIR / "RadRegion.py").read_text()))
    assert used, "found no widget use in RadRegion.py"
    assert used <= names, f"RadRegion.py uses widgets missing from RadRegion.ui: {sorted(used - names)}"
    classes = {w.get("class") for w in ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "RadRegion.ui").iter("widget")}
    assert not {c for c in classes if c.startswith(("ctk", "qMRML"))}, "keep the .ui buildable by QUiLoader"
