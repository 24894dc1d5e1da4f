"""The MidPO MoE as an MLflow pyfunc model that loads and generates without midpo installed.

The model is logged as *models from code* (MLflow's recommendation; this MLflow refuses to unpickle a
``python_model`` by default): a small entry file (:data:`MODEL_CODE`) calls ``set_model(MoEPyfunc())``,
and ``core.py``, ``package.py`` and this file travel as ``code_paths``, which MLflow puts first on
``sys.path`` when it loads the model. The MoE folder (:func:`midpo.moe.package.save_moe`) is the one
artifact, ``moe``.

Contract (interfaces.md, "MLflow"): input a list of prompts, a list of chat-message lists
(``[{"role": "user", "content": ...}, ...]``), a single prompt, or a pandas DataFrame with a ``prompt``
column; params ``temperature`` (0 = greedy, the default), ``max_new_tokens``, ``top_p``; output the
generated texts, one per prompt.
"""

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

if __package__:  # imported as midpo.moe.serving
    from . import package
else:  # shipped as top-level code modules (MLflow code_paths)
    import package  # type: ignore[no-redef]

ARTIFACT = "moe"
DEFAULT_PARAMS = {"temperature": 0.0, "max_new_tokens": 64, "top_p": 1.0}

# The models-from-code entry file. At log time MLflow runs it inside midpo; at load time the shipped
# ``serving.py`` (code/ first on sys.path) is found first, so midpo is never needed.
MODEL_CODE = '''"""MLflow models-from-code entry of the MidPO MoE (written by midpo.moe.serving.log_moe_model)."""
from mlflow.models import set_model

try:
    from serving import MoEPyfunc  # the copy shipped with the model (code_paths)
except ImportError:
    from midpo.moe.serving import MoEPyfunc  # at log time, inside midpo

set_model(MoEPyfunc())
'''
MODEL_CODE_FILE = "midpo_moe_model.py"


def prompts_of(model_input: Any) -> list[Any]:
    """The prompts of a pyfunc input: each a string or a chat-message list."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - mlflow depends on pandas
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            items = model_input["prompt"].tolist()
        elif "messages" in model_input.columns:
            items = model_input["messages"].tolist()
        elif len(model_input.columns) == 1:
            items = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(f"a DataFrame input needs a 'prompt' column, got {list(model_input.columns)}")
    elif pd is not None and isinstance(model_input, pd.Series):
        items = model_input.tolist()
    elif isinstance(model_input, str):
        items = [model_input]
    elif isinstance(model_input, Mapping):
        if "prompt" in model_input:
            p = model_input["prompt"]
            items = [p] if isinstance(p, str) else list(p)
        elif "messages" in model_input:
            items = [model_input["messages"]]
        else:
            raise ValueError(f"a dict input needs a 'prompt' or 'messages' key, got {sorted(model_input)}")
    elif isinstance(model_input, (list, tuple)) or hasattr(model_input, "tolist"):
        items = list(model_input.tolist() if hasattr(model_input, "tolist") else model_input)
        if items and isinstance(items[0], Mapping):  # one chat-message list given bare
            items = [items]
    else:
        raise TypeError(f"unsupported input type {type(model_input).__name__}: pass a list of prompts or of chat-message lists")
    out = []
    for item in items:
        if hasattr(item, "tolist"):  # numpy arrays from pandas
            item = item.tolist()
        if not isinstance(item, str):
            item = [dict(m) for m in item]
        out.append(item)
    return out


def generation_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = sorted(set(merged) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown params {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    return {"temperature": float(merged["temperature"]), "max_new_tokens": int(merged["max_new_tokens"]), "top_p": float(merged["top_p"])}


# No type hint on predict: inputs are prompts or chat-message lists, which MLflow's hint-based validation
# cannot express (it then advises adding hints once, a harmless UserWarning); prompts_of checks the input.
class MoEPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the ``moe`` artifact with :func:`package.load_moe` (hashes checked) and generates."""

    def load_context(self, context):
        self.model, self.tokenizer = package.load_moe(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params=None):
        return package.generate(self.model, self.tokenizer, prompts_of(model_input), **generation_params(params))


def signature() -> Any:
    """No input schema (prompts or chat-message lists), string outputs, the three generation params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([
        ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
        ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
    ])
    return ModelSignature(inputs=None, outputs=Schema([ColSpec("string")]), params=params)


def pip_requirements() -> list[str]:
    """The installed versions of what the shipped code imports (a ``+cpu``/``+cu121`` local tag dropped)."""
    from importlib.metadata import version

    pins = [f"{d}=={version(d).split('+')[0]}" for d in ("mlflow", "torch", "transformers", "safetensors", "jinja2")]
    return pins


def code_paths() -> list[str]:
    here = Path(package.__file__).resolve().parent
    return [str(here / f) for f in ("core.py", "package.py", "serving.py")]


def log_moe_model(
    folder: str | Path,
    registered_model_name: str | None = None,
    name: str = "model",
    alias: str | None = None,
    **kwargs: Any,
) -> Any:
    """Log the MoE folder as a pyfunc model in the active run (or a new one in the current experiment).

    With ``registered_model_name`` the model becomes a new version of that registered model; ``alias``
    (e.g. ``champion``) then points at that version. Returns MLflow's ``ModelInfo``
    (``registered_model_version`` set when registered). ``kwargs`` go to ``mlflow.pyfunc.log_model``.
    """
    folder = Path(folder)
    package.read_moe_config(folder)  # a MoE folder, of a format this code reads
    if alias and not registered_model_name:
        raise ValueError("an alias needs registered_model_name")
    with tempfile.TemporaryDirectory(prefix="midpo-pyfunc-") as tmp:
        entry = Path(tmp) / MODEL_CODE_FILE
        entry.write_text(MODEL_CODE)
        started = mlflow.active_run() is None
        run = mlflow.start_run(run_name="midpo-moe") if started else None
        try:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(entry),
                artifacts={ARTIFACT: str(folder)},
                code_paths=code_paths(),
                signature=signature(),
                pip_requirements=pip_requirements(),
                registered_model_name=registered_model_name,
                **kwargs,
            )
        finally:
            if run is not None:
                mlflow.end_run()
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_model_name, alias, str(info.registered_model_version))
    return info
