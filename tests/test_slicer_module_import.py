"""RadRegion.py imports with minimal stand-in slicer/qt/ctk/vtk modules; RadRegionLib stays Slicer-free and
3.9-clean."""

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

    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
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
    return {
        "slicer": slicer,
        "slicer.ScriptedLoadableModule": slm,
        "qt": types.ModuleType("qt"),
        "ctk": types.ModuleType("ctk"),
        "vtk": types.ModuleType("vtk"),
    }


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
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import RadRegionLib, RadRegionLib.panel; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('slicer', 'qt', 'ctk', 'vtk', 'PySide6', 'PyQt5', 'requests', 'numpy')); print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, timeout=60)
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
    used |= set(
        re.findall(r'"(\w+(?:Button|Edit|Widget|Label|Bar|ComboBox))"', (MODULE_DIR / "RadRegion.py").read_text())
    )
    assert used, "found no widget use in RadRegion.py"
    assert used <= names, f"RadRegion.py uses widgets missing from RadRegion.ui: {sorted(used - names)}"
    ui_file = MODULE_DIR / "Resources" / "UI" / "RadRegion.ui"
    classes = {w.get("class") for w in ElementTree.parse(ui_file).iter("widget")}
    assert not {c for c in classes if c.startswith(("ctk", "qMRML"))}, "keep the .ui buildable by QUiLoader"


# -- a PythonQt-like `qt` over PySide6, to drive RadRegionWidget offscreen -------------------------------------------

PYTHONQT_PROPERTIES = ("text", "currentData")  # read as attributes in PythonQt, methods in PySide6


class PythonQtObject:
    """A PySide6 object seen the PythonQt way: `.connect("signal()", slot)` and properties as attributes."""

    def __init__(self, obj):
        object.__setattr__(self, "obj", obj)

    def connect(self, signature, slot):
        getattr(self.obj, signature.split("(")[0]).connect(lambda *args: slot(*args))

    def __getattr__(self, name):
        value = getattr(self.obj, name)
        return value() if name in PYTHONQT_PROPERTIES else value

    def __eq__(self, other):
        return self.obj is getattr(other, "obj", other)

    def __hash__(self):
        return hash(id(self.obj))


def pythonqt_standins(tmp_path):
    """slicer/qt stand-ins on PySide6: RadRegionWidget builds its real panel and its shortcuts work."""
    os_environ_offscreen()
    from PySide6 import QtCore, QtGui, QtWidgets
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    modules = standin_modules()
    main_window = QtWidgets.QMainWindow()
    settings = {}

    class QSettings:
        def value(self, key, default=None):
            return settings.get(key, default)

        def setValue(self, key, value):
            settings[key] = value

    qt = types.ModuleType("qt")
    for name in ("QApplication", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QAbstractSpinBox"):
        setattr(qt, name, getattr(QtWidgets, name))
    qt.Qt, qt.QKeySequence, qt.QSettings = QtCore.Qt, QtGui.QKeySequence, QSettings
    qt.QTimer = lambda: PythonQtObject(QtCore.QTimer())
    qt.QShortcut = lambda keys, parent: PythonQtObject(QtGui.QShortcut(keys, parent))

    def load_ui(path):
        file = QFile(str(path))
        file.open(QFile.ReadOnly)
        try:
            return QUiLoader().load(file)
        finally:
            file.close()

    def child_widget_variables(widget):
        children = widget.findChildren(QtWidgets.QWidget)
        return types.SimpleNamespace(**{c.objectName(): PythonQtObject(c) for c in children if c.objectName()})

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            panel = QtWidgets.QWidget()
            self.layout = QtWidgets.QVBoxLayout(panel)
            main_window.setCentralWidget(panel)

        def resourcePath(self, relative):
            return str(MODULE_DIR / "Resources" / relative)

    slicer = modules["slicer"]
    slicer.util.loadUI, slicer.util.childWidgetVariables = load_ui, child_widget_variables
    slicer.util.mainWindow = lambda: main_window
    slicer.app.cachePath = str(tmp_path / "slicer-cache")
    modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    modules["qt"] = qt
    return modules, app, main_window


def os_environ_offscreen():
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def import_radregion_module_with_pythonqt(monkeypatch, tmp_path):
    modules, app, main_window = pythonqt_standins(tmp_path)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    for name in [n for n in sys.modules if n == "RadRegion" or n.startswith("RadRegionLib")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("RadRegion"), app, main_window


def wait_for_panel(widget, timeout=300.0):
    """Let the Qt event loop run (the panel's poll timer included) until the panel's server call has answered."""
    import time

    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while widget.calls.busy:
        assert time.monotonic() < deadline, f"the panel's server call did not finish in {timeout:.0f} s"
        QApplication.processEvents(QEventLoop.AllEvents, 50)
        time.sleep(0.01)
    QApplication.processEvents()


def test_widget_builds_its_panel_and_explains_a_missing_server(monkeypatch, tmp_path):
    module, app, main_window = import_radregion_module_with_pythonqt(monkeypatch, tmp_path)
    widget = module.RadRegionWidget()
    widget.setup()
    widget.enter()
    assert len(widget.shortcuts) == 16  # 0-9, Return, Enter, O, A, Ctrl+Z, N
    assert widget.ui.submitButton.isEnabled() is False and widget.ui.nextButton.isEnabled() is False
    widget.ui.nextButton.obj.setEnabled(True)
    widget.ui.nextButton.click()
    assert widget.ui.statusLabel.text == "Connect to a server first"
    widget.ui.serverUrlEdit.setText("127.0.0.1:9")
    widget.ui.connectButton.click()
    assert widget.ui.statusLabel.text == "Connecting to 127.0.0.1:9…"  # the answer comes on the worker thread
    wait_for_panel(widget)
    assert widget.ui.statusLabel.text.startswith("cannot reach the RadRegion server at http://127.0.0.1:9")
    assert "Decisions are kept on this computer" in widget.ui.statusLabel.text
    widget.exit()
    assert widget.shortcuts == []
    widget.cleanup()
