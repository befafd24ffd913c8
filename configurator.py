"""nanoGPT-style configuration: a script's config is its global variables; a config file (Python
assignments) and --key=value arguments override them, in the order given. Usage, after the config block:

    from configurator import configure
    configure(globals())

Unlike nanoGPT's exec'd configurator, an unknown key or a value of the wrong type is one clear error.
"""
import ast
import sys

SIMPLE = (bool, int, float, str, tuple, list, type(None))


def config_keys(g):
    """The simple lowercase globals (UPPERCASE names are the script's constants, not settings)."""
    return {k for k, v in g.items() if not k.startswith("_") and k == k.lower() and isinstance(v, SIMPLE)}


def defaults(module):
    """The config block of an imported script: its simple globals."""
    return {k: getattr(module, k) for k in config_keys(vars(module))}


def set_key(g, keys, key, value, source):
    if key not in keys:
        raise SystemExit(f"{source}: unknown config key '{key}'. Known keys: {', '.join(sorted(keys))}")
    old = g[key]
    if type(old) is float and isinstance(value, str):
        try:
            value = float(value)  # inf, nan
        except ValueError:
            pass
    if old is not None and value is not None:
        ok = type(value) is type(old) or (type(old) is float and type(value) is int) \
            or (isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)))
        if not ok:
            raise SystemExit(f"{source}: {key} must be {type(old).__name__} (default {old!r}), got {value!r}")
        if type(old) is float:
            value = float(value)
    g[key] = value


def configure(g, argv=None):
    """Apply config files and --key=value overrides to `g` (a script's globals() or a dict of
    config keys, in place); returns the config as a plain dict."""
    keys = config_keys(g)
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--"):
            file_vars = {}
            try:
                with open(arg) as f:  # __file__ lets a preset build on another beside it
                    exec(f.read(), {"__file__": arg}, file_vars)
            except FileNotFoundError:
                raise SystemExit(f"config file not found: {arg}") from None
            for k, v in file_vars.items():
                if not k.startswith("_") and isinstance(v, SIMPLE):
                    set_key(g, keys, k, v, arg)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise SystemExit(f"{arg}: overrides are written --key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string, e.g. --device=cuda
        if isinstance(g.get(key), str):
            value = text  # a string key takes the text as written: --eval_rounds=0,5
        set_key(g, keys, key, value, arg)
    return {k: g[k] for k in sorted(keys)}
