"""configs/quantization.py restricted to the methods issue 11 changed (KIVI, GEAR, MiKV, RotateKV, SnapKV + KIVI) and
the rows they are compared with (full cache, H2O at MiKV's high-precision budget); int8/int4 are unchanged.

python -m kvjax.launch --config=configs/quantization_changed.py
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("quantization", pathlib.Path(__file__).with_name("quantization.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.run_dir = "runs/quantization_changed"
    for name in ("int8", "int4"):
        del c.methods[name]
    return c
