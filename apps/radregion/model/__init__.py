"""The shipped model bundle, installed as the package `radregion_model` (setup.py) so the server finds it in any
install: `importlib.util.find_spec("radregion_model")`. Keep this file when the bundle is replaced."""
